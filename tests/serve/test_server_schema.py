"""Schemathesis against the running server's /openapi.json: every operation, valid and
invalid requests, no 5xx and no response outside the schema.

Schemathesis' pytest loader (``from_fixture``) does not work with this pytest, so each
operation's Hypothesis strategy runs under ``@given`` here, with a bounded example count.
``positive_data_acceptance`` is left out: a schema-valid request may still be refused with
a 400 for reasons JSON Schema cannot state (a prompt longer than the context, a token id
outside the vocabulary, a model name that is not served). Valid cases generate at most
MAX_TOKENS tokens per choice so the run stays bounded. Schemathesis' list of statuses that
reject invalid data lacks 413, the server's answer to a body over its size limit (which an
invalid body of many megabytes rightly gets first); that answer is still checked against
the schema.
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

EXAMPLES = 40  # per operation and mode
MAX_TOKENS = 24  # generated tokens per choice in valid cases (chat's default is the context)
# Valid explanations stay cheap: a few integration steps over a short text.
EXPLAIN_STEPS, EXPLAIN_CHARS = 8, {"prompt": 24, "target": 4, "completion": 3, "contrast": 4}


def bounded(case):
    """Keep a valid case valid but cheap: at most MAX_TOKENS tokens per choice, and short
    explanations of at most EXPLAIN_STEPS integration steps."""
    if case.path == "/v1/explain" and isinstance(case.body, dict):
        for key, chars in EXPLAIN_CHARS.items():
            if isinstance(case.body.get(key), str):
                case.body[key] = case.body[key][:chars] or "x"
        if not isinstance(case.body.get("ig_steps"), int) or case.body["ig_steps"] > 8:
            case.body["ig_steps"] = EXPLAIN_STEPS
        return case
    if isinstance(case.body, dict) and ("prompt" in case.body or "messages" in case.body):
        for key in ("max_tokens", "max_completion_tokens"):
            if not isinstance(case.body.get(key), int) or case.body[key] > MAX_TOKENS:
                case.body[key] = MAX_TOKENS
    return case


def test_every_operation_conforms_to_the_schema(lm_server):
    schema = schemathesis.openapi.from_url(f"{lm_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} == {
        "GET /health",
        "GET /metrics",
        "GET /v1/models",
        "POST /v1/completions",
        "POST /v1/chat/completions",
        "POST /v1/classify",
        "POST /v1/explain",
    }
    for op in operations:
        modes = [GenerationMode.POSITIVE]
        if op.method.upper() == "POST":  # GET routes take no input to get wrong
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:
            strategy = op.as_strategy(generation_mode=mode)
            if mode is GenerationMode.POSITIVE:
                strategy = strategy.map(bounded)

            @given(case=strategy)
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def check(case) -> None:
                response = case.call(base_url=lm_server.url, timeout=60)
                excluded = [positive_data_acceptance]
                if response.status_code == 413:  # a body over --max_body_mib: refused, rightly
                    excluded.append(negative_data_rejection)
                case.validate_response(response, excluded_checks=excluded)

            check()
