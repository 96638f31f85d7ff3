"""Everything regenerated from records only: the sampler leaderboard, plots, the reproduction
scorecard, the full report and the README's generated sections."""
from bench_core.report.leaderboard import leaderboard, markdown_table, read_csv, to_csv, to_markdown
from bench_core.report.plots import make_plots
from bench_core.report.report import update_readme, write_report
from bench_core.report.scorecard import scorecard, scorecard_markdown

__all__ = [
    "leaderboard", "to_markdown", "to_csv", "read_csv", "markdown_table", "make_plots", "scorecard",
    "scorecard_markdown", "write_report", "update_readme",
]
