"""Test-session settings.

One intra-op thread: on a 2-core machine that other processes also load, torch's default two threads
were seen to slow small-tensor work by 10-100x (both threads spin-waiting on a busy core), which made
the suite's timing unpredictable.  Numbers do not depend on it; speed is measured in benchmarks/, not here.
The environment variable also reaches the subprocesses that some tests start.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory):
    """A file in torch-fidelity's inception-v3-compat format with random weights (the real ones cannot be
    downloaded here): written once per test session, for every test of the Inception path."""
    from unittest import mock

    from torch_fidelity import feature_extractor_inceptionv3 as fe

    torch.manual_seed(0)
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for m in net.modules():  # keep activations O(1) through the random network
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.save(net.state_dict(), path)
    return path

