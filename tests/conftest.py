import os

# Tests share two cores with each other's subprocesses; one thread each keeps timings stable.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def repo_root():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent


@pytest.fixture
def train_interrupted_and_resumed(tmp_path):
    """A function (images, labels, config, settings) -> (resumed net, job folder): trains a domain net
    straight through, then again with an interrupt after epoch 1 and a resume from its job folder,
    and checks that the two runs end with bit-identical weights."""
    from cmboost.metrics.domain_training import train_domain_net

    def run(images, labels, config, settings):
        straight = train_domain_net(images, labels, config, settings, log=None)
        state = tmp_path / "net.job"

        def interrupt_after_first_epoch(line):
            if line.startswith("epoch 1/"):
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            train_domain_net(images, labels, config, settings, job_folder=state, log=interrupt_after_first_epoch)
        assert (state / "state.safetensors").is_file()
        resumed = train_domain_net(images, labels, config, settings, job_folder=state, log=None)
        for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
        return resumed, state

    return run
