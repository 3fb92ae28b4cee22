"""`jaxengine generate` (and the flags it shares with `client`) as a user runs it: a real
process on the shipped model, against the Python API on the same model; and `import
jaxengine` in an interpreter without torch, which must print no "PyTorch was not found"."""

import subprocess
import sys

import pytest

from jaxengine import LLM, SamplingParams
from jaxengine.config import default_model_dir
from models.loading.generation_config import sampling_defaults
from serving.cli import ECHO_CHARS


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving.cli", *args], capture_output=True, text=True, timeout=600)


def test_generate_prints_prompt_and_greedy_continuation():
    proc = _run("generate", "def fibonacci(n):", "--max-tokens", "12", "--temperature", "0", "--quiet")
    assert proc.returncode == 0, proc.stderr
    want = LLM(progress=False).generate("def fibonacci(n):", SamplingParams(max_tokens=12, temperature=0))[0]
    assert proc.stdout == "def fibonacci(n):" + want.outputs[0].text + "\n"


def test_generate_rejects_bad_sampling_parameter():
    proc = _run("generate", "x", "--temperature", "-1", "--quiet")
    assert proc.returncode == 2
    assert "temperature must be" in proc.stderr


# ---------------------------------------------------------------------------- --n, --seed, defaults, echo

@pytest.fixture(scope="module")
def default_llm():
    return LLM(progress=False)


def test_generate_n_samples_with_a_seed(default_llm):
    proc = _run("generate", "def parse(line):", "--n", "3", "--seed", "7", "--temperature", "1.0",
                "--max-tokens", "8", "--quiet")
    assert proc.returncode == 0, proc.stderr
    want = default_llm.generate("def parse(line):", SamplingParams(n=3, seed=7, temperature=1.0, max_tokens=8))[0]
    expected = "".join(f"--- sample {i + 1} of 3 ---\ndef parse(line):{o.text}\n" for i, o in enumerate(want.outputs))
    assert proc.stdout == expected
    # The seed is the request's: another seed, other samples; the same seed, the same ones.
    other = default_llm.generate("def parse(line):", SamplingParams(n=3, seed=8, temperature=1.0, max_tokens=8))[0]
    assert [o.text for o in other.outputs] != [o.text for o in want.outputs]


def test_generate_samples_as_the_generation_config_says_and_echoes_only_the_end_of_a_long_prompt(default_llm):
    """Unset sampling flags take the model's generation_config.json (vLLM's --generation-config
    auto); `--generation-config vllm` ignores it (SamplingParams' defaults)."""
    prompt = "".join(f"x{i} = {i}\n" for i in range(120))  # ~1100 characters
    defaults = sampling_defaults(default_model_dir())
    assert defaults and defaults.get("temperature", 1.0) != 1.0  # the shipped model publishes its own
    for flag, kw in (("auto", defaults), ("vllm", {})):
        proc = _run("generate", prompt, "--max-tokens", "6", "--seed", "3", "--generation-config", flag, "--quiet")
        assert proc.returncode == 0, proc.stderr
        want = default_llm.generate(prompt, SamplingParams(max_tokens=6, seed=3, **kw))[0].outputs[0].text
        assert proc.stdout == "..." + prompt[-ECHO_CHARS:] + want + "\n"


def test_generation_config_folder_without_the_file_is_a_clear_error(tmp_path):
    proc = _run("generate", "x", "--generation-config", str(tmp_path), "--quiet")
    assert proc.returncode == 2
    assert f"--generation-config {tmp_path}: no generation_config.json there" in proc.stderr


def test_generate_and_client_share_sampling_flags_and_defaults():
    from serving.cli import build_parser

    def sampling(command: str) -> dict:
        args = vars(build_parser().parse_args([command, "x"]))
        return {k: args[k] for k in ("n", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop")}

    # Unset (None): the model's generation_config, applied by `generate` or by the server.
    assert sampling("generate") == sampling("client") == dict(n=1, max_tokens=128, temperature=None, top_p=None,
                                                              top_k=None, seed=None, stop=None)


def test_quantization_flags_reach_the_engine_arguments():
    from jaxengine.config import EngineConfig
    from serving.cli import build_parser, engine_kwargs

    for command in ("generate", "serve"):
        args = build_parser().parse_args([command, *(["x"] if command == "generate" else []), "--quantization", "fp8",
                                          "--kv-cache-dtype", "fp8"])
        kwargs = engine_kwargs(args)
        assert (kwargs["quantization"], kwargs["kv_cache_dtype"]) == ("fp8", "fp8")
        config = EngineConfig.from_kwargs(None, **kwargs)
        assert (config.quantization, config.kv_cache_dtype) == ("fp8", "fp8")
    unset = engine_kwargs(build_parser().parse_args(["generate", "x"]))
    assert (unset["quantization"], unset["kv_cache_dtype"]) == (None, "auto")
    proc = _run("generate", "x", "--quantization", "awq")
    assert proc.returncode == 2 and "invalid choice: 'awq'" in proc.stderr and "'fp8', 'int8'" in proc.stderr


def test_help_says_what_seed_means():
    gen, srv, cli = (_run(cmd, "--help").stdout for cmd in ("generate", "serve", "client"))
    assert "SamplingParams.seed" in " ".join(gen.split()) and "SamplingParams.seed" in " ".join(cli.split())
    assert "requests that bring no seed" in " ".join(srv.split())
    assert "--sampling-seed" not in gen + srv + cli
    assert "--chat-template" in srv and "--n N" in gen and "--n N" in cli


def test_generate_rejects_n_zero():
    proc = _run("generate", "x", "--n", "0", "--quiet")
    assert proc.returncode == 2 and "n must be" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------- no torch, no banner

# Python with torch made unimportable, as in a venv without it: find_spec("torch") is None.
_NO_TORCH = "import sys; sys.modules['torch'] = None\n"


def test_no_pytorch_banner_without_torch():
    load = (_NO_TORCH + "import jaxengine\nfrom jaxengine.config import default_model_dir\n"
            "from jaxengine.engine.tokenizer import load_tokenizer\n"
            "print(load_tokenizer(default_model_dir()).encode('def f():'))\n")
    proc = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "PyTorch was not found" not in proc.stderr, proc.stderr
    # The same interpreter without jaxengine does print it: the check above can fail.
    bare = subprocess.run([sys.executable, "-c", _NO_TORCH + "import transformers"], capture_output=True, text=True,
                          timeout=120)
    assert "PyTorch was not found" in bare.stderr
    # Only that line is dropped: transformers' other warnings still reach the user.
    other = (_NO_TORCH + "import jaxengine.engine.tokenizer\nimport transformers\n"
             "transformers.utils.logging.get_logger('transformers').warning('another warning')\n")
    proc = subprocess.run([sys.executable, "-c", other], capture_output=True, text=True, timeout=120)
    assert "another warning" in proc.stderr and "PyTorch was not found" not in proc.stderr, proc.stderr
