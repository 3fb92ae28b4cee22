"""`jaxengine` command line: generate, serve, client.

One `--seed`, the sampling seed, everywhere: on `generate` and `client` it is the request's
own seed (SamplingParams.seed: the same seed, prompt and parameters give the same text); on
`serve`, which sends no requests, it seeds the engine's random source, from which every
request that brings no seed of its own draws one (vLLM's --seed; also a preset's random
weights). Unset, `generate` leaves requests unseeded: they draw from the engine's source,
seeded 0, so a run is still repeatable.

Sampling defaults are the same in `generate` and `client`, as in vLLM: a flag left unset
takes the model's generation_config.json value (`--generation-config auto`, read by
`generate`, or by `serve` for its clients), else SamplingParams' default (temperature 1.0).
`--generation-config vllm` ignores the file; `--temperature 0` is greedy.

Errors are one `error: ...` line on stderr, no traceback: exit code 2 for a bad argument or
prompt, 1 for a model that cannot be loaded (its message names the file and what is wrong)
and for a server that could not start or stopped because a process it needs died.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from serving import event_loop

ECHO_CHARS = 200  # `generate` echoes at most this much of a prompt: its end, which the completion continues


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None, help="checkpoint dir or preset name (default: the shipped code model)")
    g.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the model dir)")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    g.add_argument("--quantization", default=None, choices=["fp8", "int8"],
                   help="fp8: W8A8 decoder linears (per-channel weights, per-token activations); int8: weight-only "
                        "(default: the checkpoint's own, else none)")
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                   help="KV cache dtype (fp8 is not implemented yet)")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--max-num-seqs", type=int, default=None, help="default: 1024 on a GPU of >= 70 GiB (not A100), 256 on other GPUs, 16 on CPU")
    g.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: 8192 on GPU, 256 on CPU")
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--max-n", type=int, default=None, help="most samples (n) one request may ask for (default 128)")
    g.add_argument("--tensor-parallel-size", type=int, default=1)
    g.add_argument("--data-parallel-size", type=int, default=1)
    g.add_argument("--stream-interval", type=int, default=1,
                   help="streams send a message per this many new tokens (first and last at once)")
    g.add_argument("--num-scheduler-steps", type=int, default=1,
                   help="decode steps per dispatch when every running request decodes (1: off)")
    g.add_argument("--sequence-parallel-min-tokens", type=int, default=None,
                   help="tensor parallel: steps of at least this many tokens split the residual stream by token")
    g.add_argument("--structured-outputs-backend", default="xgrammar", choices=["xgrammar", "llguidance"],
                   help="grammar library of structured outputs")
    g.add_argument("--structured-outputs-disable-any-whitespace", action="store_true",
                   help="constrained JSON has no free whitespace between tokens (weak models waste fewer tokens)")
    g.add_argument("--prefill-attention-body", default="auto", choices=["auto", "mosaic", "triton"],
                   help="attention kernel for prefill tokens (auto: Mosaic GPU on Hopper, Triton elsewhere)")


def _add_generation_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--generation-config", default="auto",
                   help="sampling defaults: 'auto' (the model's generation_config.json), 'vllm' (none: "
                        "SamplingParams' own), or a folder holding a generation_config.json")


def sampling_defaults(args: argparse.Namespace) -> dict:
    """The sampling fields requests leave unset take (vLLM's --generation-config)."""
    from jaxengine.config import default_model_dir
    from models.loading.generation_config import sampling_defaults as read

    if args.generation_config == "vllm":
        return {}
    if args.generation_config == "auto":
        return read(args.model or default_model_dir())
    if not (Path(args.generation_config) / "generation_config.json").is_file():
        raise ValueError(f"--generation-config {args.generation_config}: no generation_config.json there "
                         "(pass a folder holding one, 'auto' or 'vllm')")
    return read(args.generation_config)


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        tokenizer=args.tokenizer, dtype=args.dtype, quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype, max_model_len=args.max_model_len, block_size=args.block_size,
        gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=not args.no_prefix_caching,
        tensor_parallel_size=args.tensor_parallel_size, data_parallel_size=args.data_parallel_size,
        stream_interval=args.stream_interval, num_scheduler_steps=args.num_scheduler_steps,
        sequence_parallel_min_tokens=args.sequence_parallel_min_tokens,
        prefill_attention_body=args.prefill_attention_body, structured_outputs_backend=args.structured_outputs_backend,
        structured_outputs_disable_any_whitespace=args.structured_outputs_disable_any_whitespace,
    ) | ({} if args.max_n is None else dict(max_n=args.max_n))


def _error(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def _check_model(model: str | None) -> str | None:
    """Why `model` cannot be loaded, found from its config.json alone (before anything
    starts); None when it looks loadable. The weights are checked as they load."""
    from jaxengine.config import default_model_dir
    from models.loading.presets import model_config

    try:
        model_config(model or str(default_model_dir()))
    except (OSError, ValueError) as e:
        return str(e)
    return None


def _check_tokenizer(model: str | None, tokenizer: str | None) -> str | None:
    """Why text prompts cannot be tokenized for this model; None when they can."""
    from jaxengine.config import default_model_dir
    from jaxengine.engine.tokenizer import load_tokenizer
    from models.loading.presets import PRESETS

    if tokenizer is None and model in PRESETS:
        return f"preset {model!r} has random weights and no tokenizer: pass --tokenizer DIR to generate from text"
    try:
        load_tokenizer(tokenizer or model or default_model_dir())
    except (OSError, ValueError) as e:
        return f"text prompts need a tokenizer: {e}"
    return None


def _echo(prompt: str) -> str:
    return prompt if len(prompt) <= ECHO_CHARS else "..." + prompt[-ECHO_CHARS:]


def _add_sampling_args(p: argparse.ArgumentParser, *, seed_help: str) -> None:
    """The same sampling flags and defaults for `generate` and `client`."""
    g = p.add_argument_group("sampling")
    g.add_argument("--n", type=int, default=1, help="samples per prompt (SamplingParams.n)")
    g.add_argument("--max-tokens", type=int, default=128)
    unset = "default: the model's generation_config.json, else SamplingParams' "
    g.add_argument("--temperature", type=float, default=None, help=unset + "(1.0); 0 is greedy")
    g.add_argument("--top-p", type=float, default=None, help=unset + "(1.0)")
    g.add_argument("--top-k", type=int, default=None, help=unset + "(-1: off)")
    g.add_argument("--seed", type=int, default=None, help=seed_help)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")


def _sampling_flags(args: argparse.Namespace) -> dict:
    """The sampling flags given on the command line (unset ones are left to the defaults)."""
    flags = dict(n=args.n, max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                 top_k=args.top_k, seed=args.seed)
    return {k: v for k, v in flags.items() if v is not None}


def _generate(args: argparse.Namespace) -> int:
    from jaxengine.entrypoints.llm import LLM
    from jaxengine.sampling_params import SamplingParams

    try:
        params = SamplingParams(**sampling_defaults(args) | _sampling_flags(args), stop=args.stop or None)
    except ValueError as e:
        return _error(str(e), 2)
    problem = _check_model(args.model) or _check_tokenizer(args.model, args.tokenizer)
    if problem is not None:
        return _error(problem, 1)
    try:
        llm = LLM(args.model, progress=not args.quiet, **engine_kwargs(args))
    except (OSError, ValueError) as e:  # the model's files: the message names the file
        return _error(f"could not load the model: {e}", 1)
    for prompt in args.prompts:
        try:
            if args.n == 1:
                print(_echo(prompt), end="", flush=True)
                for delta in llm.stream(prompt, params):
                    print(delta.outputs[0].text, end="", flush=True)
                print()
                continue
            # Several samples: each printed whole once done, not interleaved.
            (out,) = llm.generate([prompt], params, use_tqdm=False)
            for o in out.outputs:
                print(f"--- sample {o.index + 1} of {args.n} ---")
                print(_echo(prompt) + o.text, flush=True)
        except (ValueError, TypeError) as e:  # a prompt the engine cannot take
            print(flush=True)  # end the echoed line on stdout
            return _error(str(e), 2)
    return 0


def _serve(args: argparse.Namespace) -> int:
    import os

    from jaxengine.config import EngineConfig
    from jaxengine.engine.tokenizer import load_chat_template
    from serving.launch import serve
    from serving.server import ServeOptions

    keys = tuple(args.api_key or ()) or tuple(k for k in [os.environ.get("JAXENGINE_API_KEY")] if k)
    kwargs = engine_kwargs(args) | dict(seed=args.seed)
    if args.engine_process and args.coordinator_address:
        print("error: --engine-process is single-host: drop it, or --coordinator-address", file=sys.stderr)
        return 2
    # Default: the engine in a child process (vLLM V1's engine core), except multi-host, whose
    # engine joins JAX's distributed runtime in this process.
    engine_process = args.engine_process if args.engine_process is not None else not args.coordinator_address
    if args.api_server_count < 1:
        print(f"error: --api-server-count must be >= 1, got {args.api_server_count}", file=sys.stderr)
        return 2
    if args.api_server_count > 1 and not engine_process:
        print("error: --api-server-count > 1 needs the engine in its own process (single host, no --no-engine-process)",
              file=sys.stderr)
        return 2
    try:
        chat_template = None if args.chat_template is None else load_chat_template(args.chat_template)
    except (OSError, ValueError) as e:
        return _error(f"--chat-template: {e}", 2)
    problem = _check_model(args.model)
    if problem is not None:
        return _error(problem, 1)
    if args.coordinator_address:
        # Multi-host: join JAX's runtime first; process 0 serves and schedules, the others
        # replay its steps on their devices (jaxengine.worker.multihost).
        from models.sharding import initialize_distributed

        initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
        kwargs["host_loop_on_process_zero"] = True
        if args.process_id != 0:
            from jaxengine.engine.llm_engine import Engine

            Engine(EngineConfig.from_kwargs(args.model, **kwargs), progress=False).follow()
            return 0
    if args.num_kv_blocks is not None:
        kwargs["num_kv_blocks"] = args.num_kv_blocks
    try:
        options = ServeOptions(
            host=args.host, port=args.port, model_name=args.served_model_name or args.model or "default",
            api_keys=keys, tls_cert=args.tls_cert, tls_key=args.tls_key, metrics_port=args.metrics_port,
            max_queue=args.max_queue, drain_timeout=args.drain_timeout, chat_template=chat_template,
            sampling_defaults=sampling_defaults(args), http_port=args.http_port or None,
            allowed_origins=_origins(args.allowed_origins), http_max_body_bytes=args.http_max_body_bytes,
            tool_call_parser=args.tool_call_parser, enable_auto_tool_choice=args.enable_auto_tool_choice,
            loop=args.loop,
        )
        config = EngineConfig.from_kwargs(args.model, **kwargs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return event_loop.run(serve(options, config, progress=not args.quiet, engine_process=engine_process,
                                api_server_count=args.api_server_count), options.loop)


def _origins(values: list[str] | None) -> tuple[str, ...]:
    """--allowed-origins, repeatable; a value may also be vLLM's JSON list ('["https://a"]')."""
    import json

    out: list[str] = []
    for v in values or ():
        if v.lstrip().startswith("["):
            try:
                parsed = json.loads(v)
            except ValueError as e:
                raise ValueError(f"--allowed-origins {v!r}: not a JSON list ({e})") from None
            if not isinstance(parsed, list) or not all(isinstance(o, str) for o in parsed):
                raise ValueError(f"--allowed-origins {v!r}: a JSON list must hold origin strings")
            out += parsed
        else:
            out.append(v)
    return tuple(out)


def _client(args: argparse.Namespace) -> int:
    import grpc

    from serving.client import Client

    root = open(args.tls_ca, "rb").read() if args.tls_ca else None
    sampling = _sampling_flags(args)  # unset ones: the server's defaults
    if args.stop:
        sampling["stop"] = args.stop
    prompt = dict(messages=[{"role": "user", "content": args.prompt}]) if args.chat else dict(prompt=args.prompt)
    with Client(args.target, api_key=args.api_key, root_certificates=root, tls=args.tls, timeout=args.timeout) as c:
        try:
            if args.stream and args.n == 1:
                for piece in c.stream_text(**prompt, **sampling):
                    print(piece, end="", flush=True)
                print()
            elif args.n == 1:
                print(c.generate(**prompt, **sampling).text)
            else:  # as `generate` prints several samples
                for completion in c.generate(**prompt, **sampling).completions:
                    print(f"--- sample {completion.index + 1} of {args.n} ---")
                    print(completion.text, flush=True)
        except grpc.RpcError as e:
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxengine", description="JAX LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete prompts and print the text as it is generated")
    gen.add_argument("prompts", nargs="+")
    _add_sampling_args(gen, seed_help="sampling seed of each request (SamplingParams.seed); default: none, "
                                      "drawn from the engine's source seeded 0, so a run repeats")
    gen.add_argument("--quiet", action="store_true", help="no compile progress bar")
    _add_engine_args(gen)
    _add_generation_config_arg(gen)

    srv = sub.add_parser("serve", help="serve the model over gRPC (jaxengine.v1.EngineService) and HTTP (OpenAI API)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    srv.add_argument("--port", type=int, default=50051, help="0: any free port (printed once ready)")
    srv.add_argument("--served-model-name", default=None,
                     help="name in GetModelInfo, /v1/models (the `model` requests send) and metrics (default: --model)")
    srv.add_argument("--api-key", action="append",
                     help="require this key, over gRPC and HTTP (repeatable; default: $JAXENGINE_API_KEY)")
    srv.add_argument("--tls-cert", default=None, help="PEM certificate chain (with --tls-key)")
    srv.add_argument("--tls-key", default=None, help="PEM private key")
    srv.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    srv.add_argument("--max-queue", type=int, default=None,
                     help="reject with RESOURCE_EXHAUSTED (HTTP 429) when this many requests wait for their first step")
    srv.add_argument("--drain-timeout", type=float, default=30.0, help="seconds in-flight calls get after SIGTERM")
    srv.add_argument("--num-kv-blocks", type=int, default=None, help="KV-cache blocks (default: sized from memory)")
    srv.add_argument("--seed", type=int, default=0,
                     help="seed of the engine's sampling source: requests that bring no seed draw theirs from it "
                          "(and a preset's random weights); a request's own seed wins")
    srv.add_argument("--chat-template", default=None,
                     help="Jinja chat template for chat requests, a file or the template itself (vLLM's flag); "
                          "default: the tokenizer's")
    srv.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                     help="run the engine loop in a child process, so the gRPC loop never holds its GIL "
                          "(default on a single host; an H200 served 1.9x the tokens/s with it)")
    srv.add_argument("--api-server-count", type=int, default=1,
                     help="front-end processes sharing the gRPC and HTTP ports over the one engine process (vLLM's name); "
                          "one carries ~10k streamed messages/s")
    srv.add_argument("--quiet", action="store_true", help="no compile progress bar")
    srv.add_argument("--loop", choices=event_loop.LOOPS, default="auto",
                     help="event loop of the servers (uvicorn's flag): auto takes uvloop where installed")
    h = srv.add_argument_group("HTTP (OpenAI-compatible API, on --host)")
    h.add_argument("--http-port", type=int, default=8000,
                   help="port of the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, ...); 0: off")
    h.add_argument("--allowed-origins", action="append", default=None,
                   help="CORS: an origin allowed to call the HTTP API (repeatable, or a JSON list as in vLLM; "
                        "'*' for any); default: no CORS")
    h.add_argument("--http-max-body-bytes", type=int, default=16 << 20,
                   help="largest HTTP request body (413 above it; default 16 MiB)")
    h.add_argument("--tool-call-parser", default=None,
                   help="read tool calls out of chat outputs in this format (vLLM's names: hermes, llama3_json, ...)")
    h.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="let requests with tools use tool_choice 'auto' (vLLM's flag; needs --tool-call-parser)")
    srv.add_argument("--coordinator-address", default=None,
                     help="multi-host: HOST:PORT of process 0 (jax.distributed); run one `serve` per host")
    srv.add_argument("--num-processes", type=int, default=1)
    srv.add_argument("--process-id", type=int, default=0, help="0 serves; the others follow its steps")
    _add_engine_args(srv)
    _add_generation_config_arg(srv)

    cli = sub.add_parser("client", help="send one prompt to a running server and print the completion")
    cli.add_argument("prompt")
    cli.add_argument("--target", default="127.0.0.1:50051", help="host:port of the server")
    cli.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    cli.add_argument("--chat", action="store_true",
                     help="send the prompt as a user chat message (rendered with the model's chat template, or "
                          "the server's --chat-template)")
    _add_sampling_args(cli, seed_help="sampling seed of the request (SamplingParams.seed); default: none, "
                                      "drawn from the server's source (serve --seed)")
    cli.add_argument("--api-key", default=None)
    cli.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    cli.add_argument("--tls-ca", default=None, help="PEM root certificate to trust (implies TLS)")
    cli.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "generate":
        return _generate(args)
    if args.command == "serve":
        return _serve(args)
    if args.command == "client":
        return _client(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
