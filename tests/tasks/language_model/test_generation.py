"""The decoder's KV cache, the step-wise generator and its sampling options."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from modelworks.data.text import CharTokenizer
from modelworks.errors import InputError
from modelworks.models.transformer import Decoder, DecoderConfig, causal_attention_in_blocks
from modelworks.tasks.language_model.predictor import CompletionRequest, TextGenerator
from modelworks.models.sampling import SamplingOptions, choose_token, filter_logits
from modelworks.tasks.language_model.task import eager_runner, generate_uncached

VOCAB = "abcdefghijklmnopqrstuvwxyz .\n"


def random_decoder(**options) -> Decoder:
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=len(VOCAB), context=48, n_layer=2, n_head=2, n_embd=32, **options)
    model = Decoder(cfg).eval()
    with torch.no_grad():  # zero-initialised projections would make every block the identity: not a real test
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def generator(context: int = 48) -> TextGenerator:
    tokenizer = CharTokenizer(list(VOCAB), end_of_text=False)
    graphs = {"prefill": {"inputs": [], "outputs": []}}
    return TextGenerator(TextGenerator.build_spec(tokenizer, context, graphs), tokenizer)


@pytest.mark.parametrize("options", [{}, {"positions": "learned", "norm": "layernorm", "mlp": "gelu",
                                          "qk_norm": False, "tie_embeddings": True}])
def test_cached_greedy_decoding_equals_uncached_token_for_token(options):
    """Prompts of different lengths batched together (left padding, per-row positions): each row's greedy text
    with the cache is the text of re-running the whole context for every token."""
    model = random_decoder(**options)
    gen = generator()
    prompts = ["the king", "a", "night and day and night."]
    items = [gen.parse(CompletionRequest(prompt=p, max_tokens=20, temperature=0.0)) for p in prompts]
    with torch.no_grad():
        responses = gen.predict(items, eager_runner(model))
        for prompt, response in zip(prompts, responses):
            expected = generate_uncached(model, gen.tokenizer.encode(prompt), 20)
            assert gen.tokenizer.encode(response.text) == expected
    assert len({r.text for r in responses}) == 3  # the rows are not all the same answer


def test_sequences_join_and_leave_the_batch_at_any_step():
    """The step API: a sequence started while another is decoding gets the same text as alone."""
    model = random_decoder()
    gen = generator()
    run = eager_runner(model)
    request = lambda p, n: gen.parse(CompletionRequest(prompt=p, max_tokens=n, temperature=0.9, seed=7))  # noqa
    alone = gen.predict([request("lord", 12)], run)[0].text
    long = gen.start(request("the queen speaks", 30))
    active = [long]
    with torch.no_grad():
        for _ in range(5):
            gen.step(active, run)
        late = gen.start(request("lord", 12))
        active.append(late)
        while not late.finished:
            gen.step(active, run)
            active = [s for s in active if not s.finished] or active
    assert late.finished and not long.finished  # the late, short request finished first
    assert gen.respond(late).text == alone


def test_a_sequence_moved_down_into_a_freed_slot_keeps_its_text():
    """A decode step hands the graph slots 0..n-1: when a sequence in a low slot ends, the one in the highest slot
    moves into it (its keys/values copied), and its text is the text it gets alone."""
    model = random_decoder()
    gen = generator()
    run = eager_runner(model)
    request = lambda p, n: gen.parse(CompletionRequest(prompt=p, max_tokens=n, temperature=0.9, seed=3))  # noqa
    with torch.no_grad():
        alone = gen.predict([request("night", 25)], run)[0].text
        short, middle, last = gen.start(request("a", 3)), gen.start(request("the king", 40)), gen.start(
            request("night", 25))
        active = [short, middle, last]
        gen.step(active, run)
        assert (short.slot, middle.slot, last.slot) == (0, 1, 2)
        while not last.finished:
            gen.step(active, run)
            active = [s for s in active if not s.finished]
        assert short.finished and last.slot == 0  # moved down when the short one left
    assert gen.respond(last).text == alone


def test_a_package_with_the_earlier_decode_graph_still_generates():
    """Packages exported before the in-place decode graph take the past gathered [L, 2, B, H, S, D] and a mask;
    the predictor still drives them (their spec names the input `past`), to the same greedy text."""
    from modelworks.export.runtime import GraphSet, TorchRunner

    class GatheredDecode(torch.nn.Module):  # that graph, as it was exported
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, tokens, positions, mask, past):
            logits, kv = self.model(tokens, positions, mask, past, return_cache=True)
            return logits[:, -1].float(), kv

    model = random_decoder()
    tokenizer = CharTokenizer(list(VOCAB), end_of_text=False)
    names = ["tokens", "positions", "mask", "past"]
    graphs = {"prefill": {"inputs": [], "outputs": []},
              "decode": {"inputs": [{"name": n} for n in names], "outputs": ["logits", "kv"]}}
    old = TextGenerator(TextGenerator.build_spec(tokenizer, 48, graphs), tokenizer)
    run = GraphSet({"prefill": eager_runner(model).runners["prefill"],
                    "decode": TorchRunner(GatheredDecode(model), names)})
    items = lambda gen: [gen.parse(CompletionRequest(prompt=p, max_tokens=60, temperature=0.0))  # noqa: E731
                         for p in ("the king", "a")]
    with torch.no_grad():
        assert old.gathered_decode and not generator().gathered_decode
        texts = [r.text for r in old.predict(items(old), run)]
        assert texts == [r.text for r in generator().predict(items(generator()), eager_runner(model))]


def test_seeded_sampling_is_deterministic_and_seeds_differ():
    model = random_decoder()
    gen = generator()
    run = eager_runner(model)
    make = lambda seed: gen.parse(CompletionRequest(prompt="the", max_tokens=25, temperature=1.0, seed=seed))  # noqa
    with torch.no_grad():
        a, b, c = gen.predict([make(1), make(1), make(2)], run)
    assert a.text == b.text and a.text != c.text


def test_top_k_top_p_and_min_p_masks():
    logits = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05]))
    kept = lambda out: np.flatnonzero(np.isfinite(out)).tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [0, 1]
    assert kept(filter_logits(logits, top_p=0.7)) == [0, 1]  # 0.5 + 0.2 reaches 0.7
    assert kept(filter_logits(logits, top_p=0.71)) == [0, 1, 2]
    assert kept(filter_logits(logits, top_p=0.01)) == [0]  # the top token is always kept
    assert kept(filter_logits(logits, min_p=0.3)) == [0, 1, 2]  # >= 0.3 x 0.5
    rng = np.random.default_rng(0)
    draws = {choose_token(logits, np.array([]), np.array([]), SamplingOptions(top_k=2), rng) for _ in range(200)}
    assert draws == {0, 1}


def test_penalties_move_probability_away_from_seen_tokens():
    logits = np.array([2.0, 1.9, -1.0])
    greedy = SamplingOptions(temperature=0.0)
    rng = np.random.default_rng(0)
    assert choose_token(logits, np.array([0]), np.array([0]), greedy, rng) == 0
    repeat = SamplingOptions(temperature=0.0, repetition_penalty=1.2)
    assert choose_token(logits, np.array([0]), np.array([]), repeat, rng) == 1  # 2.0 / 1.2 < 1.9
    presence = SamplingOptions(temperature=0.0, presence_penalty=0.5)
    assert choose_token(logits, np.array([0]), np.array([0]), presence, rng) == 1


def test_stop_strings_end_the_text_before_them():
    model = random_decoder()
    gen = generator()
    run = eager_runner(model)
    with torch.no_grad():
        free = gen.predict([gen.parse(CompletionRequest(prompt="the", max_tokens=30, temperature=0.0))], run)[0]
        stop = free.text[5:7]
        cut = gen.predict([gen.parse(CompletionRequest(prompt="the", max_tokens=30, temperature=0.0,
                                                       stop=[stop]))], run)[0]
    assert cut.text == free.text[:free.text.find(stop)] and cut.finish_reason == "stop"
    assert free.finish_reason == "length" and free.completion_tokens == 30


def test_generation_past_the_context_keeps_going():
    model = random_decoder()
    gen = generator(context=48)
    with torch.no_grad():
        response = gen.predict([gen.parse(CompletionRequest(prompt="the king", max_tokens=100, temperature=0.0))],
                               eager_runner(model))[0]
    assert response.completion_tokens == 100 and len(response.text) == 100


@pytest.mark.parametrize("fields, message", [
    ({"prompt": ""}, r"prompt: empty"),
    ({"prompt": "x" * 49}, r"prompt: 49 tokens, longer than the model's context of 48"),
    ({"prompt": "ABC"}, r"prompt: characters 'ABC' are not in this character model's vocabulary"),
    ({"prompt": "a", "max_tokens": 0}, r"max_tokens: must be between 1 and 4096 \(got 0\)"),
    ({"prompt": "a", "stop": [""]}, r"stop: an empty stop string"),
])
def test_bad_requests_are_refused_naming_the_field(fields, message):
    with pytest.raises(InputError, match=message):
        generator().parse(CompletionRequest(**fields))


def test_wrongly_typed_fields_are_refused_by_the_request_model():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="stop"):
        CompletionRequest(prompt="a", stop=5)
    with pytest.raises(ValidationError, match="max_tokens"):
        CompletionRequest(prompt="a", max_tokens="3")


def test_cross_attention_reads_the_memory():
    """The hook captioning uses: with cross_attention, the logits depend on the memory sequence."""
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=10, context=8, n_layer=1, n_head=2, n_embd=16, cross_attention=True,
                                  zero_init_proj=False)).eval()
    tokens = torch.randint(0, 10, (2, 5))
    memory = torch.randn(2, 3, 16)
    with torch.no_grad():
        a, b = model(tokens, memory=memory), model(tokens, memory=memory + 1)
    assert a.shape == (2, 5, 10) and not torch.allclose(a, b)


@pytest.mark.parametrize("options", [{}, {"positions": "learned", "norm": "layernorm", "mlp": "gelu",
                                          "qk_norm": False}])
def test_last_only_gives_the_last_positions_logits_and_every_positions_cache(options):
    """Decoder.forward(last_only=True), what a prefill and SASRec's next-item score read: plain causal, with left
    padding (one row all padding but its last token), and after a cache, as the full forward's last position."""
    model = random_decoder(**options)
    tokens = torch.randint(0, len(VOCAB), (3, 10))
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, :4] = False
    mask[2, :9] = False
    with torch.no_grad():
        for kwargs in ({}, {"mask": mask}):
            full, full_cache = model(tokens, return_cache=True, **kwargs)
            last, last_cache = model(tokens, return_cache=True, last_only=True, **kwargs)
            assert last.shape == (3, 1, len(VOCAB))
            torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(last_cache, full_cache)
        more = torch.randint(0, len(VOCAB), (3, 4))
        after = dict(positions=torch.arange(10, 14).expand(3, 4), past=full_cache,
                     mask=torch.cat([mask, torch.ones(3, 4, dtype=torch.bool)], 1))
        torch.testing.assert_close(model(more, last_only=True, **after), model(more, **after)[:, -1:],
                                   atol=1e-5, rtol=1e-5)
    assert not torch.allclose(last, full[:, :1])  # the positions differ: the comparison above can fail


@pytest.mark.parametrize("length,block", [(12, 5), (16, 8), (7, 128)])
def test_causal_attention_in_blocks_equals_the_fused_kernel_with_gradients(length, block):
    """The compiled CPU training path's attention (blocks of queries, each against the keys up to its end), ragged
    last block included: outputs and gradients as scaled_dot_product_attention(is_causal=True) gives them."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, length, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ours = causal_attention_in_blocks(q, k, v, block=block)
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    fused = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    expected = torch.autograd.grad(fused.square().sum(), (q, k, v))
    torch.testing.assert_close(ours, fused)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)
    assert not torch.allclose(ours[:, :, 0], ours[:, :, -1])  # positions differ: the check can fail


def test_compiled_training_on_a_cpu_attends_in_blocks_and_matches_eager(monkeypatch):
    """Under torch.compile on a CPU the decoder's causal attention takes causal_attention_in_blocks (the call is
    counted while compiling); the loss and the gradients are eager PyTorch's."""
    import modelworks.models.transformer as transformer

    calls = []
    blocks = transformer.causal_attention_in_blocks
    monkeypatch.setattr(transformer, "causal_attention_in_blocks", lambda *a, **k: calls.append(1) or blocks(*a, **k))
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=11, context=20, n_layer=1, n_head=2, n_embd=16, zero_init_proj=False))
    tokens = torch.randint(0, 11, (2, 20))

    def loss_and_grads(forward):
        model.zero_grad()
        loss = forward(tokens).square().mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    eager_loss, eager_grads = loss_and_grads(model)
    assert not calls
    torch._dynamo.reset()
    # aot_eager: traced as under the engine's torch.compile (the dispatch is decided while tracing), without the
    # C++ code generation, which takes most of a minute here.
    compiled_loss, compiled_grads = loss_and_grads(torch.compile(model, backend="aot_eager"))
    assert calls
    torch.testing.assert_close(compiled_loss, eager_loss, atol=1e-5, rtol=1e-4)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_streamed_deltas_of_byte_level_tokens_join_into_valid_text():
    """A BPE token may end inside a UTF-8 character: deltas never hand out half a character, and their
    concatenation is the response's text."""
    from modelworks.data.text import BPETokenizer

    tokenizer = BPETokenizer.train(["héllo wörld ✓ ünïcode " * 30], vocab_size=300)
    graphs = {"prefill": {"inputs": [], "outputs": []}}
    gen = TextGenerator(TextGenerator.build_spec(tokenizer, 48, graphs), tokenizer)
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=tokenizer.vocab_size, context=48, n_layer=1, n_head=2, n_embd=16,
                                  zero_init_proj=False)).eval()
    sequence = gen.start(gen.parse(CompletionRequest(prompt="h", max_tokens=40, temperature=1.5, seed=3)))
    deltas = []
    with torch.no_grad():
        while not sequence.finished:
            deltas += [d.text for d in gen.step([sequence], eager_runner(model))]
    assert "".join(deltas) == gen.respond(sequence).text
    assert not any(d.endswith("\ufffd") for d in deltas[:-1])  # no delta stops inside a character


def test_slots_are_reused_after_the_end_and_freed_when_a_sequence_is_dropped():
    """The preallocated cache: a finished sequence's slot goes to the next one; a sequence dropped unfinished (a
    client that left) frees its slot once nothing refers to it; the cache grows only past the slots in use."""
    import gc

    model = random_decoder()
    gen = generator()
    run = eager_runner(model)
    request = lambda n: gen.parse(CompletionRequest(prompt="the", max_tokens=n, temperature=0.0))  # noqa: E731
    with torch.no_grad():
        first = gen.start(request(2))
        dropped = gen.start(request(50))
        gen.step([first, dropped], run)
        slots = first.slots
        used = {first.slot, dropped.slot}
        gen.step([first, dropped], run)
        assert first.finished and slots.cache.shape[2] == 2
        late = gen.start(request(3))
        gen.step([late, dropped], run)
        assert late.slot in used and late.slot != dropped.slot  # the finished one's slot
        del dropped
        gc.collect()
        again = gen.start(request(3))
        gen.step([again, late], run)
        assert again.slot in used and slots.cache.shape[2] == 2  # the dropped one's slot; no growth


def test_a_row_samples_the_same_token_alone_and_in_a_mixed_batch():
    """Batched sampling is row-wise: per-row options (greedy, top-k, top-p, min-p, penalties) beside each other
    give each row what it gets alone, drawing from its own generator."""
    from modelworks.models.sampling import BatchOptions, choose_tokens

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(5, 40)).astype(np.float32)
    options = [SamplingOptions(temperature=0.0), SamplingOptions(top_k=5), SamplingOptions(top_p=0.5),
               SamplingOptions(min_p=0.2, temperature=0.7), SamplingOptions(top_k=3, repetition_penalty=1.3,
                                                                            presence_penalty=0.5)]
    seen = np.zeros((5, 40), bool)
    seen[4, np.argsort(-logits[4])[:2]] = True  # the two best tokens of the penalised row were already used

    def draw(rows):
        generators = [np.random.default_rng(100 + r) for r in rows]
        return choose_tokens(logits[rows], BatchOptions.of([options[r] for r in rows]),
                             lambda which: [generators[i].random() for i in which], seen[rows], seen[rows])

    alone = [int(draw([r])[0]) for r in range(5)]
    assert draw(list(range(5))).tolist() == alone
    assert draw([4, 2, 0]).tolist() == [alone[4], alone[2], alone[0]]
    assert alone[0] == int(np.argmax(logits[0]))


def test_the_fused_onnx_graphs_generate_what_eager_pytorch_generates(tmp_path):
    """The exported prefill and decode graphs (opset 23: RMSNormalization, RotaryEmbedding, Attention; the decode
    graph's attention is GroupQueryAttention writing into the bound cache in place) against the same model in
    PyTorch: prompts of different lengths in one batch (left padding, masked keys) and a generation past the
    context (the window restarts), greedy, token for token."""
    pytest.importorskip("onnxruntime")
    import onnx
    from modelworks.export.formats import write_onnx
    from modelworks.export.runtime import GraphSet, OnnxRunner
    from modelworks.tasks.language_model.task import decoder_graphs

    model = random_decoder(qk_norm=False)
    gen = generator()
    runners, graphs = {}, decoder_graphs(model)
    for name, graph in graphs.items():  # as the package holds them
        path = tmp_path / f"{name}.onnx"
        write_onnx(graph.module, graph.example_inputs, path, graph.input_names, graph.output_names,
                   graph.dynamic_axes, graph.onnx_opset)
        runners[name] = OnnxRunner(path, threads=1)
    nodes = onnx.load(str(tmp_path / "decode.onnx")).graph.node
    ops = {node.op_type for node in nodes}
    # Without QK-norm the kernel takes q, k and v packed and rotates q and k itself: no Split, no RotaryEmbedding.
    assert {"RMSNormalization", "GroupQueryAttention"} <= ops and not {"Transpose", "Split", "RotaryEmbedding"} & ops
    readers = {node.op_type for node in nodes for name in node.input if name.startswith("past_")}
    assert readers == {"GroupQueryAttention"}  # the cache goes to the attention whole: nothing copies it
    prompts = ["the king", "a", "night and day and night."]
    items = lambda: [gen.parse(CompletionRequest(prompt=p, max_tokens=60, temperature=0.0)) for p in prompts]  # noqa
    with torch.no_grad():
        expected = [r.text for r in gen.predict(items(), eager_runner(model))]
    assert [r.text for r in gen.predict(items(), GraphSet(runners))] == expected
    # One decode step with the caches bound by address: each row's new key lands at its position in place, and
    # nothing else in the cache moves.
    caches = [np.random.default_rng(i).normal(size=(3, 2, 48, 16)).astype(np.float32) for i in range(4)]
    before = [c.copy() for c in caches]
    positions = np.array([[5], [0], [47]])
    inputs = {"tokens": np.array([[1], [2], [3]]), "positions": positions,
              **{name: c for name, c in zip(graphs["decode"].input_names[2:], caches)}}
    logits, *presents = runners["decode"](inputs, out=[None, *caches])
    want_logits, *want = eager_runner(model).runners["decode"]({k: v.copy() for k, v in inputs.items()})
    assert all(p is c for p, c in zip(presents, caches)) and np.allclose(logits, want_logits, atol=1e-4)
    for cache, old, eager_cache in zip(caches, before, want):
        for row, at in enumerate(positions[:, 0]):
            assert np.allclose(cache[row, :, at], eager_cache[row, :, at], atol=1e-5)
            assert np.array_equal(np.delete(cache[row], at, axis=1), np.delete(old[row], at, axis=1))
    assert len(set(expected)) == 3 and all(len(text) == 60 for text in expected)


def test_the_onnx_runner_keeps_its_binding_and_still_sees_every_change(tmp_path):
    """OnnxRunner keeps one IOBinding per thread and binds an array again only when its address, shape or type
    changed. Each call must still read the arrays' current contents: the same arrays written in place, new
    arrays, another batch size (with the logits left to ONNX Runtime, then bound), and another thread."""
    pytest.importorskip("onnxruntime")
    from modelworks.export.formats import write_onnx
    from modelworks.export.runtime import OnnxRunner
    from modelworks.tasks.language_model.task import decoder_graphs

    model = random_decoder(qk_norm=False)
    graph = decoder_graphs(model)["decode"]
    path = tmp_path / "decode.onnx"
    write_onnx(graph.module, graph.example_inputs, path, graph.input_names, graph.output_names, graph.dynamic_axes,
               graph.onnx_opset)
    runner, eager = OnnxRunner(path, threads=1), eager_runner(model).runners["decode"]
    rng = np.random.default_rng(0)

    def inputs_for(rows):
        caches = [rng.normal(size=(rows, 2, 48, 16)).astype(np.float32) for _ in range(4)]
        return {"tokens": rng.integers(0, len(VOCAB), (rows, 1)), "positions": rng.integers(0, 48, (rows, 1)),
                **dict(zip(graph.input_names[2:], caches))}, caches

    def check(inputs, caches, logits_out=None):
        want_logits, *_ = eager({k: v.copy() for k, v in inputs.items()})
        logits, *presents = runner(inputs, out=[logits_out, *caches])
        assert all(p is c for p, c in zip(presents, caches))
        assert logits.shape == want_logits.shape and np.allclose(logits, want_logits, atol=1e-4)
        return logits

    inputs, caches = inputs_for(3)
    first = check(inputs, caches).copy()
    inputs["tokens"][:] = (inputs["tokens"] + 7) % len(VOCAB)  # the same arrays, new contents
    assert not np.allclose(check(inputs, caches), first)
    check(*inputs_for(3))  # new arrays at other addresses
    check(*inputs_for(5))  # another batch size: ORT's logits of 3 rows must not be taken for a buffer
    inputs, caches = inputs_for(2)
    buffer = np.zeros((2, len(VOCAB)), np.float32)
    assert check(inputs, caches, buffer) is buffer  # every output given: the caller's arrays come back
    inputs["positions"][:] = 0
    check(inputs, caches, buffer)
    with ThreadPoolExecutor(1) as pool:  # another thread: its own binding (errors surface through result())
        pool.submit(lambda: check(*inputs_for(4))).result()
    check(*inputs_for(4))  # and this thread's binding is still right


def test_a_sequence_stepping_alone_after_the_cache_grew_keeps_its_keys():
    """The decode step keeps its arrays and cache views per batch size; when a new sequence makes the cache grow,
    views of the old array must not be used again. A runs alone, B joins (the cache grows from 1 slot to 2) and
    leaves, A runs alone again (1 row: the size it had before the growth), then C joins: A's text must be what A
    generates on its own, greedy, token for token."""
    model = random_decoder()
    run = eager_runner(model)
    request = lambda prompt, n: CompletionRequest(prompt=prompt, max_tokens=n, temperature=0.0)  # noqa: E731
    with torch.no_grad():
        (alone,) = generator().predict([generator().parse(request("the king", 30))], run)
        gen = generator()
        a = gen.start(gen.parse(request("the king", 30)))
        for _ in range(5):
            gen.step([a], run)
        b = gen.start(gen.parse(request("a", 2)))
        while not b.finished:
            gen.step([a, b], run)
        assert a.slots.cache.shape[2] == 2  # it grew
        for _ in range(5):
            gen.step([a], run)
        c = gen.start(gen.parse(request("night", 30)))
        while not a.finished:
            gen.step([a, c], run)
    assert gen.respond(a).text == alone.text and len(alone.text) == 30
