"""Structured outputs: grammar-constrained decoding (JSON schema, regex, choice, EBNF).

`StructuredOutputManager` (manager.py) compiles each request's `GrammarSpec` (grammar_spec.py)
with a backend (backend.py: xgrammar) on a thread pool, caches compiled grammars by spec, and
fills each step's packed token bitmask from the requests' `GrammarRequest`s (grammar_request.py),
whose matchers follow the accepted tokens. The mask is applied on the device by the sampler
(jaxengine.sample.grammar_mask).
"""
