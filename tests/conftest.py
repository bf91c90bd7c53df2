import os

# Without a GPU, the cuda backend's Triton kernels run in Triton's interpreter; Triton reads this switch when it
# is first imported (transformers may import it early), so it is set before anything else.
if not os.path.exists("/dev/nvidia0") and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "real_model: uses a real pretrained model or dataset shipped in a package")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    cpu = torch.backends.cpu.get_cpu_capability()
    return f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu {cpu}, load {os.getloadavg()[0]:.2f}"


@pytest.fixture(scope="session")
def tiny_lm_folder(tmp_path_factory):
    """A Hugging Face folder: a tiny random Llama with the MiniLM tokenizer (plumbing for CLI / report tests)."""
    pytest.importorskip("transformers")
    from octoquant.models.minilm import load_minilm
    from tests._tiny import tiny_llama

    tok, _ = load_minilm()
    folder = tmp_path_factory.mktemp("lm") / "tiny-lm"
    tiny_llama(vocab=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
