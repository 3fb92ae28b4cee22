"""The host side of structured outputs without a model: a request waits in the scheduler while its
grammar compiles (and others run), its matcher follows the tokens the scheduler accepts, a finished
grammar ends the request with "stop", and the step's bitmask rows are the matcher's."""

from concurrent.futures import Future

import numpy as np
import pytest
import xgrammar
from transformers import AutoTokenizer

from jaxengine.config import default_model_dir
from jaxengine.core.request import Request, RequestStatus
from jaxengine.core.sched.scheduler import Scheduler, SchedulerConfig
from jaxengine.sampling_params import SamplingParams, StructuredOutputsParams
from jaxengine.structured_output.grammar_request import GrammarRequest
from jaxengine.structured_output.manager import StructuredOutputManager, bitmask_words


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_dir())


@pytest.fixture()
def manager(tokenizer):
    m = StructuredOutputManager("xgrammar", tokenizer, len(tokenizer), (tokenizer.eos_token_id,))
    yield m
    m.close()


def _sched() -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64, block_size=4,
                                     num_blocks=32))


def _request(rid: str, eos: int, so: StructuredOutputsParams | None = None) -> Request:
    return Request(rid, [5, 6, 7], SamplingParams(max_tokens=16, structured_outputs=so), eos_token_id=eos)


def test_a_request_waits_for_its_grammar_while_others_run(manager, tokenizer):
    sched = _sched()
    compiling = _request("c", tokenizer.eos_token_id, StructuredOutputsParams(choice=["yes", "no"]))
    future: Future = Future()  # its compile job, not done yet
    compiling.structured_output = GrammarRequest(future, manager.backend.matcher)
    free = _request("f", tokenizer.eos_token_id)
    sched.add_request(compiling)
    sched.add_request(free)
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == ["f"]
    sched.update(out, {"f": [9]})
    spec = manager.request(compiling.sampling_params.structured_outputs)
    future.set_result(manager.grammar_request(spec)._future.result())
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == ["f", "c"]


def test_matcher_follows_tokens_and_a_finished_grammar_stops_the_request(manager, tokenizer):
    sched = _sched()
    so = StructuredOutputsParams(choice=["yes", "no"])
    req = _request("r", tokenizer.eos_token_id, so)
    req.structured_output = manager.grammar_request(manager.request(so))
    sched.add_request(req)
    req.structured_output.wait(10)
    yes = tokenizer.encode("yes", add_special_tokens=False)
    for i, tok in enumerate(yes + [tokenizer.eos_token_id]):
        out = sched.schedule()
        mask = manager.bitmask(out.scheduled, 16)
        assert mask.shape == (16, bitmask_words(len(tokenizer)))
        assert (mask[1:] == -1).all()  # padding rows: everything allowed
        allowed = np.flatnonzero(np.unpackbits(mask[0].view(np.uint8), bitorder="little"))
        assert tok in allowed and len(allowed) < len(tokenizer)
        if i == 0:
            assert tokenizer.eos_token_id not in allowed  # nothing chosen yet: cannot end
        sched.update(out, {"r": [tok]})
    assert req.status == RequestStatus.FINISHED_STOPPED
    assert req.structured_output.is_terminated()


def test_a_token_the_grammar_rejects_aborts_the_request(manager, tokenizer):
    sched = _sched()
    so = StructuredOutputsParams(regex="[0-9]+")
    req = _request("r", tokenizer.eos_token_id, so)
    req.structured_output = manager.grammar_request(manager.request(so))
    sched.add_request(req)
    req.structured_output.wait(10)
    out = sched.schedule()
    sched.update(out, {"r": tokenizer.encode("abc", add_special_tokens=False)[:1]})
    assert req.status == RequestStatus.FINISHED_ABORTED


def test_unconstrained_steps_make_no_mask(manager, tokenizer):
    sched = _sched()
    sched.add_request(_request("f", tokenizer.eos_token_id))
    assert manager.bitmask(sched.schedule().scheduled, 16) is None


def test_bitmask_layout_is_xgrammars(manager):
    """Bit t % 32 of word t // 32 is token t: the layout apply_token_bitmask unpacks."""
    shape = xgrammar.get_bitmask_shape(1, manager.vocab_size)
    assert shape == (1, bitmask_words(manager.vocab_size))
