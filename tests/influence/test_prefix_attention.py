import pytest
import torch

from nncift.influence import prefix_attention as pa


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (8, 1)])
def test_shared_prefix_attention_equals_causal_attention_over_the_whole_sequence(heads, kv_heads):
    torch.manual_seed(0)
    b, p, s, d = 3, 11, 7, 16
    k_pre, v_pre = torch.randn(1, kv_heads, p, d), torch.randn(1, kv_heads, p, d)
    q = torch.randn(b, heads, s, d)
    k, v = torch.randn(b, kv_heads, s, d), torch.randn(b, kv_heads, s, d)
    got = pa.shared_prefix_attention(q, k, v, k_pre, v_pre, scale=d**-0.5)
    g = heads // kv_heads
    kk = torch.cat([k_pre.expand(b, -1, -1, -1), k], 2).repeat_interleave(g, 1)
    vv = torch.cat([v_pre.expand(b, -1, -1, -1), v], 2).repeat_interleave(g, 1)
    mask = torch.ones(s, p + s, dtype=torch.bool).tril(p)  # query i sees the prefix and suffix keys <= i
    want = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=d**-0.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_fused_attention_with_lse_equals_the_reference(causal):
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 3, 9, 8) for _ in range(3))
    out, lse = pa.attend(q, k, v, causal, 0.3)
    ref_out, ref_lse = pa.attend_reference(q, k, v, causal, 0.3)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_bf16_shared_prefix_attention_is_close_to_float32():
    torch.manual_seed(2)
    args = [torch.randn(2, 4, 6, 16), torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 16)]
    pre = [torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)]
    ref = pa.shared_prefix_attention(*args, *pre, scale=0.25)
    got = pa.shared_prefix_attention(*(a.bfloat16() for a in args), *(x.bfloat16() for x in pre), scale=0.25)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, atol=3e-2, rtol=3e-2)


def test_a_model_forward_over_a_shared_prefix_equals_the_full_forward():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    m = LlamaForCausalLM(cfg).eval()
    p, s, b = 13, 8, 3
    pre, suf = torch.randint(0, 300, (1, p)), torch.randint(0, 300, (b, s))
    before = m.config._attn_implementation
    with torch.no_grad():
        full = m.model(input_ids=torch.cat([pre.expand(b, -1), suf], 1)).last_hidden_state[:, p:]
        with pa.use_shared_prefix_attention(m):
            out = m.model(input_ids=pre, use_cache=True)
            cache = out.cache if "cache" in out.__dataclass_fields__ else out.past_key_values
            with pa.shared_prefix([(layer.keys, layer.values) for layer in cache.layers]):
                pos = (torch.arange(s) + p)[None].expand(b, -1)
                got = m.model(input_ids=suf, position_ids=pos, use_cache=False).last_hidden_state
    assert m.config._attn_implementation == before  # restored
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)
