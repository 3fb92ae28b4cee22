"""`jaxengine` command line: generate, serve, client."""

from __future__ import annotations

import argparse
import sys


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None, help="checkpoint dir or preset name (default: the shipped code model)")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--max-num-seqs", type=int, default=None, help="default: 1024 on a GPU of >= 70 GiB (not A100), 256 on other GPUs, 16 on CPU")
    g.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: 8192 on GPU, 256 on CPU")
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--tensor-parallel-size", type=int, default=1)
    g.add_argument("--data-parallel-size", type=int, default=1)
    g.add_argument("--stream-interval", type=int, default=1,
                   help="streams send a message per this many new tokens (first and last at once)")
    g.add_argument("--num-scheduler-steps", type=int, default=1,
                   help="decode steps per dispatch when every running request decodes (1: off)")
    g.add_argument("--sequence-parallel-min-tokens", type=int, default=None,
                   help="tensor parallel: steps of at least this many tokens split the residual stream by token")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        dtype=args.dtype, max_model_len=args.max_model_len, block_size=args.block_size,
        gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=not args.no_prefix_caching,
        seed=args.seed, tensor_parallel_size=args.tensor_parallel_size, data_parallel_size=args.data_parallel_size,
        stream_interval=args.stream_interval, num_scheduler_steps=args.num_scheduler_steps,
        sequence_parallel_min_tokens=args.sequence_parallel_min_tokens,
    )


def _generation_defaults(model: str | None) -> dict:
    """Sampling defaults from the checkpoint's generation_config.json, as vLLM does; greedy
    when the checkpoint does not ask for sampling."""
    import json
    from pathlib import Path

    from jaxengine.config import default_model_dir

    path = Path(model or default_model_dir()) / "generation_config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not cfg.get("do_sample"):
        return {}
    return {k: cfg[k] for k in ("temperature", "top_p", "top_k") if k in cfg}


def _generate(args: argparse.Namespace) -> int:
    from jaxengine.entrypoints.llm import LLM
    from jaxengine.sampling_params import SamplingParams

    defaults = _generation_defaults(args.model)
    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature if args.temperature is not None else defaults.get("temperature", 0.0),
            top_p=args.top_p if args.top_p is not None else defaults.get("top_p", 1.0),
            top_k=args.top_k if args.top_k is not None else defaults.get("top_k", -1),
            seed=args.sampling_seed, stop=args.stop or None,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    llm = LLM(args.model, progress=not args.quiet, **engine_kwargs(args))
    for prompt in args.prompts:
        print(prompt, end="", flush=True)
        try:
            for delta in llm.stream(prompt, params):
                print(delta.outputs[0].text, end="", flush=True)
        except ValueError as e:
            print(f"\nerror: {e}", file=sys.stderr)
            return 2
        print()
    return 0


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import os

    from jaxengine.config import EngineConfig
    from serving.server import ServeOptions, serve

    keys = tuple(args.api_key or ()) or tuple(k for k in [os.environ.get("JAXENGINE_API_KEY")] if k)
    kwargs = engine_kwargs(args)
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
            max_queue=args.max_queue, drain_timeout=args.drain_timeout,
        )
        config = EngineConfig.from_kwargs(args.model, **kwargs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return asyncio.run(serve(options, config, progress=not args.quiet, engine_process=engine_process,
                             api_server_count=args.api_server_count))


def _client(args: argparse.Namespace) -> int:
    import grpc

    from serving.client import Client

    root = open(args.tls_ca, "rb").read() if args.tls_ca else None
    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    if args.sampling_seed is not None:
        sampling["seed"] = args.sampling_seed
    if args.stop:
        sampling["stop"] = args.stop
    prompt = dict(messages=[{"role": "user", "content": args.prompt}]) if args.chat else dict(prompt=args.prompt)
    with Client(args.target, api_key=args.api_key, root_certificates=root, tls=args.tls, timeout=args.timeout) as c:
        try:
            if args.stream:
                for piece in c.stream_text(**prompt, **sampling):
                    print(piece, end="", flush=True)
                print()
            else:
                print(c.generate(**prompt, **sampling).text)
        except grpc.RpcError as e:
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no "PyTorch was not found" banner
    parser = argparse.ArgumentParser(prog="jaxengine", description="JAX LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete prompts and print the text as it is generated")
    gen.add_argument("prompts", nargs="+")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=None, help="default: the model's generation_config, else 0 (greedy)")
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--sampling-seed", type=int, default=None)
    gen.add_argument("--stop", action="append")
    gen.add_argument("--quiet", action="store_true", help="no compile progress bar")
    _add_engine_args(gen)

    srv = sub.add_parser("serve", help="serve the model over gRPC (jaxengine.v1.EngineService)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    srv.add_argument("--port", type=int, default=50051, help="0: any free port (printed once ready)")
    srv.add_argument("--served-model-name", default=None, help="name in GetModelInfo and metrics (default: --model)")
    srv.add_argument("--api-key", action="append", help="require this key (repeatable; default: $JAXENGINE_API_KEY)")
    srv.add_argument("--tls-cert", default=None, help="PEM certificate chain (with --tls-key)")
    srv.add_argument("--tls-key", default=None, help="PEM private key")
    srv.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    srv.add_argument("--max-queue", type=int, default=None,
                     help="reject with RESOURCE_EXHAUSTED when this many requests wait for their first step")
    srv.add_argument("--drain-timeout", type=float, default=30.0, help="seconds in-flight calls get after SIGTERM")
    srv.add_argument("--num-kv-blocks", type=int, default=None, help="KV-cache blocks (default: sized from memory)")
    srv.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                     help="run the engine loop in a child process, so the gRPC loop never holds its GIL "
                          "(default on a single host; an H200 served 1.9x the tokens/s with it)")
    srv.add_argument("--api-server-count", type=int, default=1,
                     help="gRPC front-end processes sharing the port over the one engine process (vLLM's name); "
                          "one carries ~10k streamed messages/s")
    srv.add_argument("--quiet", action="store_true", help="no compile progress bar")
    srv.add_argument("--coordinator-address", default=None,
                     help="multi-host: HOST:PORT of process 0 (jax.distributed); run one `serve` per host")
    srv.add_argument("--num-processes", type=int, default=1)
    srv.add_argument("--process-id", type=int, default=0, help="0 serves; the others follow its steps")
    _add_engine_args(srv)

    cli = sub.add_parser("client", help="send one prompt to a running server and print the completion")
    cli.add_argument("prompt")
    cli.add_argument("--target", default="127.0.0.1:50051", help="host:port of the server")
    cli.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    cli.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    cli.add_argument("--max-tokens", type=int, default=128)
    cli.add_argument("--temperature", type=float, default=0.0)
    cli.add_argument("--top-p", type=float, default=1.0)
    cli.add_argument("--top-k", type=int, default=-1)
    cli.add_argument("--sampling-seed", type=int, default=None)
    cli.add_argument("--stop", action="append")
    cli.add_argument("--api-key", default=None)
    cli.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    cli.add_argument("--tls-ca", default=None, help="PEM root certificate to trust (implies TLS)")
    cli.add_argument("--timeout", type=float, default=None, help="deadline in seconds")

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
