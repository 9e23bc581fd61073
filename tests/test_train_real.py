"""A grown tiny model trained for a few steps on real text (WB) lowers its held-out loss."""

import json

import pytest
import torch

import loire
from loire.grow import grow
from tests.conftest import DATA_ROOT

WB = DATA_ROOT / "corpora" / "wb" / "wikitext2_valid.jsonl"
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not WB.is_file(), reason=f"real corpus not found at {WB} (set LOIRE_DATA to shared/data)"),
]


def byte_blocks(path, block: int, limit: int) -> torch.Tensor:
    """Bytes of the first documents as token ids (a stand-in tokenizer: vocab 256), packed into blocks."""
    data = bytearray()
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            data += json.loads(line)["text"].encode("utf-8") + b"\n"
            if len(data) >= limit * block:
                break
    ids = torch.tensor(list(data[: limit * block]), dtype=torch.long)
    return ids.view(limit, block)


def test_grown_model_learns_from_real_text() -> None:
    torch.manual_seed(0)
    blocks = byte_blocks(WB, block=64, limit=96)
    train, held_out = blocks[:80], blocks[80:]
    config = loire.preset(
        "gpt-tiny", vocab_size=256, hidden_size=64, head_dim=16, num_attention_heads=4, intermediate_size=128
    )
    grown = grow(loire.LoireForCausalLM(config), hidden=96, ffn=200, heads=6, layers=6, seed=0).train()

    def held_out_loss() -> float:
        grown.eval()
        with torch.no_grad():
            loss = grown(held_out, labels=held_out).loss.item()
        grown.train()
        return loss

    before = held_out_loss()
    optimizer = torch.optim.AdamW(grown.parameters(), lr=3e-3)
    steps = 30
    for step in range(steps):
        grown.set_plugin_lambda(max(0.0, 1.0 - (step + 1) / (steps / 2)))  # scheduled λ: 1 → 0 over half the run
        batch = train[(step * 8) % 80 : (step * 8) % 80 + 8]
        loss = grown(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = held_out_loss()
    assert after < before - 0.5, (before, after)
    grown.consolidate()
    assert grown.config.plugin_layers == []
