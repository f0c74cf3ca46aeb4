"""The OpenAI-compatible API through the official ``openai`` client, against a real server."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path

import numpy as np
import openai
import pytest
import torch
from serving import LABELS, TEXT, serve_in_thread, served_app

PERIOD = len(TEXT.encode())  # bytes (= tokens) in one recital of TEXT
# What the reciting model says after the prompt "🌳": the rest of TEXT, again and again.
AFTER_TREE = (TEXT * 8)[1:]


@pytest.fixture(scope="module")
def client(lm_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{lm_server.url}/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def greedy(client, model, prompt, max_tokens=PERIOD, **kw):
    return client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, **kw
    )


def test_models_lists_the_served_model(client, lm_server):
    models = client.models.list().data
    assert [m.id for m in models] == [lm_server.state.served.model_name]
    assert models[0].object == "model" and models[0].owned_by == "baobab"


def test_greedy_completion_usage_and_echo(client, model):
    out = greedy(client, model, "🌳")
    choice = out.choices[0]
    assert choice.text == AFTER_TREE[: len(TEXT)]  # one recital, multi-byte characters intact
    assert choice.finish_reason == "length" and choice.index == 0
    assert out.object == "text_completion" and out.model == model
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (4, PERIOD)  # 🌳: 4 bytes
    assert out.usage.total_tokens == 4 + PERIOD
    echoed = greedy(client, model, "🌳", echo=True)
    assert echoed.choices[0].text == "🌳" + choice.text
    by_ids = greedy(client, model, list("🌳".encode()))  # token ids of the byte tokenizer
    assert by_ids.choices[0].text == choice.text


def test_stop_strings_end_the_text(client, model):
    out = greedy(client, model, "🌳", stop=["漢", "zz"])
    assert out.choices[0].text == " naïve " and out.choices[0].finish_reason == "stop"


def test_streamed_completion_equals_the_whole_one(client, model):
    whole = greedy(client, model, "🌳", max_tokens=3 * PERIOD).choices[0].text
    chunks = list(
        greedy(
            client,
            model,
            "🌳",
            max_tokens=3 * PERIOD,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == whole == AFTER_TREE[: 3 * len(TEXT)]
    # Every chunk is whole characters: no replacement character ever reaches the client.
    assert all("\ufffd" not in t for t in texts) and len(texts) > 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == 3 * PERIOD
    assert all(c.usage is None for c in chunks[:-1])


def test_n_choices_and_seed_reproducibility(client, model):
    def sample(n, seed):
        out = client.completions.create(
            model=model, prompt="🌳", max_tokens=12, temperature=2.0, n=n, seed=seed
        )
        assert [c.index for c in out.choices] == list(range(n))
        assert out.usage.completion_tokens == 12 * n
        return [c.text for c in out.choices]

    first = sample(3, seed=11)
    assert sample(3, seed=11) == first  # same seed, same request: same choices
    assert sample(1, seed=12) == first[1:2]  # choice i is sampled with seed + i
    assert len({t for s in range(5) for t in sample(1, seed=100 + s)}) > 1  # seeds matter


def test_logprobs_legacy_shape(client, model):
    out = greedy(client, model, "🌳", max_tokens=6, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert all(x <= 0 for x in lp.token_logprobs)
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_chat_completion_streamed_and_not(client, model):
    messages = [{"role": "system", "content": "Recite."}, {"role": "user", "content": "🌳"}]
    out = client.chat.completions.create(
        model=model, messages=messages, max_tokens=10, temperature=0
    )
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.usage.completion_tokens == 10 and out.usage.prompt_tokens > 4
    whole = out.choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            model=model, messages=messages, max_tokens=10, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_logprobs_and_n(client, model):
    out = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": [{"type": "text", "text": "🌳"}]}],
        max_tokens=4,
        n=2,
        seed=3,
        logprobs=True,
        top_logprobs=3,
    )
    assert [c.index for c in out.choices] == [0, 1]
    for choice in out.choices:
        entries = choice.logprobs.content
        assert len(entries) == 4 and all(1 <= len(e.top_logprobs) <= 3 for e in entries)
        # (alternatives are keyed by text: byte pieces that all read "\ufffd" count once)
        for e in entries:
            assert e.bytes is None if "\ufffd" in e.token else bytes(e.bytes).decode() == e.token


def test_concurrent_streams_equal_one_at_a_time(lm_server, client, model):
    """32 streaming clients at once get exactly what each prompt gets served alone (greedy)."""
    data = (TEXT * 4).encode()
    prompts = [list(data[i : i + 3 + i % 5]) for i in range(32)]  # varied lengths and offsets
    alone = [greedy(client, model, ids, max_tokens=16).choices[0].text for ids in prompts]

    async def run_all() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=f"{lm_server.url}/v1", api_key="none", max_retries=0)

        async def one(ids) -> str:
            stream = await aclient.completions.create(
                model=model, prompt=ids, max_tokens=16, temperature=0, stream=True
            )
            return "".join([c.choices[0].text async for c in stream])

        try:
            return await asyncio.wait_for(asyncio.gather(*(one(p) for p in prompts)), 120)
        finally:
            await aclient.close()

    together = asyncio.run(run_all())
    assert together == alone


def png(pixels) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_classify_images(image_export):
    from baobab.serve.classifier import decode_image
    from baobab.serve.launch import load_served_model

    images = [png(np.arange(64).reshape(8, 8) * 4), png(np.full((16, 16), 200))]
    model = load_served_model(str(image_export)).model  # the same weights, called directly
    x = torch.from_numpy(np.stack([decode_image(b, 1, 8) for b in images]))
    expected = model(x).softmax(-1).topk(3, dim=-1)
    with serve_in_thread(served_app(image_export)) as srv, srv.client() as http:
        assert http.get("/v1/models").json()["data"][0]["id"] == "resnet18-digits"
        body = {
            "images": [
                base64.b64encode(images[0]).decode(),
                "data:image/png;base64," + base64.b64encode(images[1]).decode(),
            ],
            "top_k": 3,
        }
        r = http.post("/v1/classify", json=body)
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert [d["index"] for d in data] == [0, 1]
        for d, ids, probs in zip(data, expected.indices.tolist(), expected.values.tolist()):
            assert [x["label"] for x in d["labels"]] == [LABELS[i] for i in ids]
            assert [x["score"] for x in d["labels"]] == pytest.approx(probs, abs=1e-5)
        bad = http.post("/v1/classify", json={"images": [base64.b64encode(b"no image").decode()]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "images"
        bad = http.post("/v1/classify", json={"images": ["%%% not base64"]})
        assert bad.status_code == 400 and "base64" in bad.json()["error"]["message"]
        r = http.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 400 and "classifies images" in r.json()["error"]["message"]
        metrics = http.get("/metrics").text
        assert 'baobab_images_classified_total{model="resnet18-digits"} 2.0' in metrics


def test_default_chat_template_keeps_special_tokens_out_of_contents():
    from baobab.data import byte_tokenizer
    from baobab.serve.chat import ChatTemplate

    tok, template = byte_tokenizer(), ChatTemplate()
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "end <|endoftext|> here"},
    ]
    assert template.render(messages) == (
        "<|system|>\nBe terse.<|endoftext|>\n"
        "<|user|>\nend <|endoftext|> here<|endoftext|>\n<|assistant|>\n"
    )
    ids = template.encode(messages, tok)
    assert ids.count(tok.eot_id) == 2  # the template's two, not the user's literal one
    assert tok.decode(ids) == template.render(messages)


def test_chat_template_beside_the_tokenizer(lm_export, tmp_path):
    import shutil

    from baobab.data import byte_tokenizer
    from baobab.serve.chat import ChatTemplate, ChatTemplateError

    export = Path(shutil.copytree(lm_export, tmp_path / "export"))
    (export / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['role'][0] }}: {{ m['content'] }}\n{% endfor %}a:"
    )
    template = ChatTemplate.for_export(export)
    messages = [{"role": "user", "content": "hi"}]
    assert template.render(messages) == "u: hi\na:"
    assert ChatTemplate.for_export(lm_export).source == ChatTemplate().source  # the default
    tok = byte_tokenizer()
    for source in ("{{ messages[0]['content'][:1] }}", "{{ ''.__class__.__mro__ }}"):
        with pytest.raises(ChatTemplateError):  # a cut-up content; the sandbox refuses
            ChatTemplate(source).encode(messages, tok)
    with pytest.raises(ValueError, match="is not a valid Jinja2 template"):
        ChatTemplate("{% for %}")
