"""The critic: value head, and values read on token_logprobs' grid (state t predicts the return from token t+1)."""
import torch

from speechrl.rlhf.model.critic import ValueHead, completion_values, token_values
from speechrl.rlhf.model.logprobs import TokenBatch, build_token_batch


def _tiny_causal_lm():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1)).eval()


def _random_head(hidden_size):
    head = ValueHead(hidden_size)
    torch.nn.init.normal_(head.linear.weight, generator=torch.Generator().manual_seed(1))
    return head


def test_value_head_starts_at_zero_in_float32_and_learns():
    head = ValueHead(8)
    hidden = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    values = head(hidden)
    assert values.shape == (2, 3) and values.dtype == torch.float32 and (values == 0).all()
    values.sum().backward()
    assert head.linear.weight.grad.abs().sum() > 0 and head.linear.bias.grad.item() == 6.0


def test_completion_values_sit_where_token_logprobs_put_completion_tokens():
    # prompts of 3 and 2 tokens, completions of 2 and 3: completion token k is predicted at
    # position len(prompt) - 1 + k, so with hidden[t] = t and V = hidden, values are those positions.
    batch = build_token_batch(None, [[5, 6, 7], [5, 6]], [[8, 9], [8, 9, 10]], [None, None], pad_id=0)
    head = ValueHead(1)
    torch.nn.init.ones_(head.linear.weight)
    hidden = torch.arange(5.0).expand(2, 5).unsqueeze(-1)  # both rows are 5 tokens: grid [B, 4]
    values = completion_values(head, hidden, batch.completion_mask)
    torch.testing.assert_close(values, torch.tensor([[0.0, 0.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0]]))


def test_token_values_see_only_the_tokens_before_their_own():
    model, head = _tiny_causal_lm(), _random_head(16)
    prompt = [1, 2, 3]
    a = build_token_batch(None, [prompt], [[4, 5, 6]], [None], pad_id=0)
    b = build_token_batch(None, [prompt], [[4, 9, 6]], [None], pad_id=0)  # completion token 1 differs
    with torch.no_grad():
        va, vb = token_values(model, head, a), token_values(model, head, b)
    # completion tokens sit at positions 2, 3, 4: V before token 1 is unchanged, V after it changes
    torch.testing.assert_close(va[0, :4], vb[0, :4])
    assert not torch.allclose(va[0, 4], vb[0, 4])
    full = model(input_ids=a.input_ids, attention_mask=a.attention_mask, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(va, completion_values(head, full.detach(), a.completion_mask))


def test_token_values_with_shared_audio_clips_match_the_full_forward():
    from transformers import Qwen2AudioConfig, Qwen2AudioEncoderConfig, Qwen2AudioForConditionalGeneration, Qwen2Config

    torch.manual_seed(0)
    audio_cfg = Qwen2AudioEncoderConfig(num_mel_bins=8, encoder_layers=1, encoder_attention_heads=2,
                                        encoder_ffn_dim=32, d_model=16, max_source_positions=20)
    text_cfg = Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1)
    model = Qwen2AudioForConditionalGeneration(Qwen2AudioConfig(audio_config=audio_cfg, text_config=text_cfg,
                                                                audio_token_index=31)).eval()
    head = _random_head(16)
    # 40 mel frames -> 20 after the first conv -> 10 audio tokens per clip
    clips = torch.randn(2, 8, 40)
    prompts = [[1] + [31] * 10 + [2], [1] + [31] * 10 + [3]]
    rows = [0, 0, 1]  # rows 0 and 1 share clip 0
    ids, comps = [prompts[c] for c in rows], [[4, 5], [6], [7, 8, 9]]
    shared = build_token_batch(None, ids, comps, [None] * 3, pad_id=0)
    shared = TokenBatch(shared.input_ids, shared.attention_mask, clips, torch.ones(2, 40, dtype=torch.long),
                        shared.completion_mask, torch.tensor(rows))
    with torch.no_grad():
        values = token_values(model, head, shared)
        full = model(input_ids=shared.input_ids, attention_mask=shared.attention_mask, input_features=clips[rows],
                     feature_attention_mask=torch.ones(3, 40, dtype=torch.long), output_hidden_states=True)
    torch.testing.assert_close(values, completion_values(head, full.hidden_states[-1], shared.completion_mask))
    assert (values[shared.completion_mask] != 0).all() and (values[~shared.completion_mask] == 0).all()
