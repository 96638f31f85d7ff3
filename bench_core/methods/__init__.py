"""Methods of single papers that run on the harness: classifier guidance (ADM), quantization (Q-Diffusion),
the speed options (Chen et al. 2023) and the probability-flow likelihood (Score SDE).  The harness itself
(``bench_core`` outside this package) knows no single paper; these modules are what the papers build on."""
