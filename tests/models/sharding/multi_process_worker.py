"""One process of the 2-process test (test_multi_process.py): joins JAX's distributed runtime
on localhost with 2 CPU devices of its own (gloo collectives), runs the engine with TP 4 over
the 4 devices of both processes, and prints the greedy tokens.

    python -m tests.models.sharding.multi_process_worker CHECKPOINT_DIR PORT PROCESS_ID NUM_PROCESSES [MODE]

MODE "replicated" (default): every process runs the same host loop on the same requests.
MODE "leader": only process 0 schedules (host_loop_on_process_zero); the others follow.
"""

import json
import sys

import jax

from tests.models.sharding.test_multi_process import ENGINE_ARGS, GREEDY, PROMPTS


def main(model_dir: str, port: int, process_id: int, num_processes: int, mode: str = "replicated") -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", 2)
    from models.sharding import initialize_distributed

    initialize_distributed(f"localhost:{port}", num_processes, process_id)
    from jaxengine import LLM

    tp = jax.device_count()
    assert jax.local_device_count() == 2 and tp == 2 * num_processes
    llm = LLM(model_dir, tensor_parallel_size=tp, host_loop_on_process_zero=mode == "leader", **ENGINE_ARGS)
    q = llm.engine.runner.state[0]
    assert len(q.sharding.device_set) == tp and len(q.addressable_shards) == 2  # this process holds 2 of tp shards
    if mode == "leader" and process_id != 0:
        print(f"FOLLOWED {llm.engine.follow()}", flush=True)
    else:
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        llm.engine.close()
        print("TOKENS " + json.dumps([o.outputs[0].token_ids for o in outs]), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), *sys.argv[5:])
