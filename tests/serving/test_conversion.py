"""serving.conversion: proto requests onto the engine's SamplingParams."""

from __future__ import annotations

from serving import conversion
from serving.generated import engine_pb2 as pb


def test_unset_sampling_fields_take_the_server_defaults():
    """conversion.sampling_params: the model's generation_config values fill only the fields
    a request leaves unset; an explicit value (greedy 0 included) wins."""
    defaults = {"temperature": 0.7, "top_p": 0.95}
    unset = conversion.sampling_params(pb.SamplingParams(max_tokens=4), defaults)
    assert (unset.temperature, unset.top_p, unset.max_tokens) == (0.7, 0.95, 4)
    greedy = conversion.sampling_params(pb.SamplingParams(temperature=0.0), defaults)
    assert (greedy.temperature, greedy.top_p) == (0.0, 0.95)
    assert conversion.sampling_params(pb.SamplingParams()).temperature == 1.0  # no defaults: SamplingParams'
