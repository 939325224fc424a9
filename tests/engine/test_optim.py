"""Optimizer choice: parameter groups (no decay on norms, biases, embeddings) and Muon beside AdamW."""

from __future__ import annotations

import torch
from torch import nn

from modelworks.config import OptimConfig
from modelworks.engine.optim import CombinedOptimizer, build_optimizer, build_schedule, parameter_groups
from modelworks.models.transformer import Decoder, DecoderConfig


def tiny_decoder(**options) -> Decoder:
    torch.manual_seed(0)
    return Decoder(DecoderConfig(vocab_size=20, context=8, n_layer=1, n_head=2, n_embd=16, **options))


def test_embeddings_norms_and_biases_get_no_weight_decay():
    model = tiny_decoder(tie_embeddings=True, bias=True)
    decay, no_decay = parameter_groups(model, 0.1)
    assert not any(p is model.embed.weight for p in decay["params"])
    assert any(p is model.embed.weight for p in no_decay["params"])
    assert all(p.ndim == 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == sum(p.numel() for p in model.parameters())


def test_muon_updates_hidden_matrices_and_adamw_the_rest():
    model = tiny_decoder()
    optimizer = build_optimizer(model, OptimConfig(name="muon", lr=1e-3, muon_lr=0.02, schedule="cosine"))
    assert isinstance(optimizer, CombinedOptimizer)
    muon, adamw = optimizer.optimizers
    muon_params = {id(p) for g in muon.param_groups for p in g["params"]}
    assert id(model.head.weight) not in muon_params and id(model.embed.weight) not in muon_params
    assert id(model.blocks[0].attn.qkv.weight) in muon_params
    assert len(muon_params) + sum(len(g["params"]) for g in adamw.param_groups) == len(list(model.parameters()))
    schedule = build_schedule(optimizer, OptimConfig(name="muon", schedule="cosine", warmup_fraction=0.5), 4)
    x = torch.randint(0, 20, (4, 8))
    losses = []
    for _ in range(4):
        loss = nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert muon.param_groups[0]["lr"] < 0.02  # the schedule drives both optimizers
    state = optimizer.state_dict()
    again = build_optimizer(tiny_decoder(), OptimConfig(name="muon"))
    again.load_state_dict(state)
    assert again.optimizers[1].state_dict()["state"].keys() == adamw.state_dict()["state"].keys()
