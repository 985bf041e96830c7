"""Tiny random models of many architectures, from transformers' own config classes: the support
matrix of tests/test_architectures.py and the README's table. Windows and chunks are small
(8 tokens) so that short prompts run far past them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers as tf

VOCAB = 128
WINDOW = 8
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
HEAD16 = dict(COMMON, head_dim=16)
# Gemma 4: global (full) layers with heads twice as wide as the sliding ones; per-layer inputs
GEMMA4 = dict(HEAD16, sliding_window=WINDOW, global_head_dim=32, hidden_size_per_layer_input=16,
              vocab_size_per_layer_input=VOCAB)
# MLA (multi-head latent attention): keys qk_nope + qk_rope wide, values v_head_dim wide, as
# many KV heads as query heads; dense layers (their experts' matmul takes at most float32)
MLA = dict(COMMON, num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8,
           qk_nope_head_dim=16)
DELTA = dict(linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
             linear_value_head_dim=16, linear_conv_kernel_dim=4)
MAMBA2 = dict(mamba_n_heads=4, mamba_d_head=32, mamba_d_state=16, mamba_n_groups=2,
              mamba_chunk_size=16)
LLAMA4 = dict(HEAD16, attention_chunk_size=WINDOW, num_local_experts=2, num_experts_per_tok=1,
              intermediate_size_mlp=128, no_rope_layers=[1, 0], interleave_moe_layer_step=1,
              layer_types=["chunked_attention", "full_attention"])


@dataclass(frozen=True)
class Arch:
    name: str
    config: str  # transformers config class
    kwargs: dict
    features: str = ""  # what the README's table says it exercises
    refused: str | None = None  # a fragment of the refusal's reason; None: supported, exact
    model: str | None = None  # the class, where the auto class does not map the config
    # float64 where the model's kernels take it (exact comparisons); the experts' grouped
    # matmul takes at most float32
    dtype: torch.dtype = torch.float64

    def build(self, seed: int) -> torch.nn.Module:
        cfg = getattr(tf, self.config)(**self.kwargs)
        torch.manual_seed(seed)
        m = (getattr(tf, self.model)(cfg) if self.model
             else tf.AutoModelForCausalLM.from_config(cfg))
        m = m.to(self.dtype).eval()
        sharpen(m)
        return m


def sharpen(model) -> None:
    """A sharper output distribution than the default init, so that greedy paths are rarely
    near-ties and a noisy copy of the model agrees with it often."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)


def noisy_copy(model, noise: float, seed: int) -> torch.nn.Module:
    """A draft that agrees with `model` often: its weights plus noise."""
    torch.manual_seed(seed)
    d = type(model)(model.config.__class__.from_dict(model.config.to_dict()))
    d = d.to(next(model.parameters()).dtype).eval()
    with torch.no_grad():
        for (_, p), (_, q) in zip(d.named_parameters(), model.named_parameters(), strict=True):
            p.copy_(q + noise * torch.randn_like(q) * q.std())
    return d


ARCHS = [
    Arch("llama", "LlamaConfig", COMMON, "full attention, GQA"),
    Arch("mistral-window", "MistralConfig", dict(COMMON, sliding_window=WINDOW),
         "sliding window (every layer)"),
    Arch("mixtral", "MixtralConfig", dict(COMMON, num_local_experts=4, num_experts_per_tok=2),
         "mixture of experts", dtype=torch.float32),
    Arch("qwen2-window", "Qwen2Config",
         dict(COMMON, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
         "sliding-window and full layers"),
    Arch("qwen3", "Qwen3Config", HEAD16, "q/k norm"),
    Arch("qwen3-moe", "Qwen3MoeConfig",
         dict(HEAD16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64),
         "mixture of experts, q/k norm", dtype=torch.float32),
    Arch("gemma", "GemmaConfig", HEAD16, "full attention"),
    Arch("gemma2", "Gemma2Config",
         dict(HEAD16, sliding_window=WINDOW, attn_logit_softcapping=20.0,
              final_logit_softcapping=30.0, query_pre_attn_scalar=16),
         "alternating sliding/full layers, attention soft-capping"),
    Arch("gemma3", "Gemma3TextConfig",
         dict(HEAD16, num_hidden_layers=3, sliding_window=WINDOW,
              layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
         "sliding-window and full layers, own RoPE per layer type"),
    Arch("cohere2", "Cohere2Config",
         dict(COMMON, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]),
         "sliding-window and full (NoPE) layers"),
    Arch("phi3", "Phi3Config", COMMON, "fused qkv"),
    Arch("olmo2", "Olmo2Config", COMMON, "q/k norm"),
    Arch("gpt2", "GPT2Config",
         dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512,
              bos_token_id=None, eos_token_id=None), "absolute positions, MHA"),
    Arch("gpt-neox", "GPTNeoXConfig",
         dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=128, max_position_embeddings=512, bos_token_id=None,
              eos_token_id=None), "partial rotary, parallel residual"),
    Arch("granite", "GraniteConfig", COMMON, "scaled residuals and logits"),
    Arch("starcoder2", "Starcoder2Config", dict(COMMON, sliding_window=WINDOW),
         "sliding window (every layer)"),
    Arch("gpt-oss", "GptOssConfig",
         dict(HEAD16, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW,
              layer_types=["sliding_attention", "full_attention"]),
         "attention sinks, sliding-window and full layers, mixture of experts",
         dtype=torch.float32),
    Arch("phi", "PhiConfig", dict(COMMON, num_key_value_heads=4), "partial rotary"),
    Arch("opt", "OPTConfig",
         dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
              num_attention_heads=4, max_position_embeddings=512, word_embed_proj_dim=64,
              bos_token_id=None, eos_token_id=None, pad_token_id=None),
         "learned absolute positions"),
    Arch("gptj", "GPTJConfig",
         dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=512,
              bos_token_id=None, eos_token_id=None), "interleaved rotary"),
    Arch("cohere", "CohereConfig", COMMON, "parallel block, logit scale"),
    Arch("smollm3", "SmolLM3Config", dict(COMMON, no_rope_layers=[1, 0]), "a NoPE layer"),
    Arch("olmo3", "Olmo3Config",
         dict(COMMON, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]),
         "sliding-window and full layers"),
    Arch("llama4-chunked", "Llama4TextConfig",
         dict(LLAMA4, attn_temperature_tuning=False),
         "chunked attention, NoPE layer, mixture of experts", model="Llama4ForCausalLM",
         dtype=torch.float32),
    Arch("gemma4", "Gemma4TextConfig",
         dict(GEMMA4, num_hidden_layers=3, attention_k_eq_v=True, num_global_key_value_heads=1,
              layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
         "per-layer KV shapes (global heads 32 wide, one KV head, keys as values), sliding "
         "and full layers"),
    Arch("gemma4-shared-kv", "Gemma4TextConfig",
         dict(GEMMA4, num_hidden_layers=4, num_kv_shared_layers=2,
              layer_types=["sliding_attention", "full_attention"] * 2),
         "per-layer KV shapes, layers reusing earlier layers' KV, sliding and full layers"),
    Arch("gemma4-multimodal", "Gemma4Config",
         dict(text_config=dict(GEMMA4, num_hidden_layers=4, num_kv_shared_layers=2,
                               pad_token_id=0,
                               layer_types=["sliding_attention", "full_attention"] * 2),
              vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, head_dim=16),
              audio_config=None),
         "Gemma 4 as its checkpoints ship (the multimodal class, text in): per-layer KV shapes, "
         "shared KV"),
    Arch("deepseek-v3", "DeepseekV3Config",
         dict(MLA, q_lora_rank=24, v_head_dim=12, n_routed_experts=4, num_experts_per_tok=2,
              moe_intermediate_size=32, first_k_dense_replace=2),
         "MLA: per-layer KV shapes (keys 24 wide, values 12; Kimi K2's too)"),
    Arch("minicpm3", "MiniCPM3Config", dict(MLA, q_lora_rank=24, v_head_dim=12),
         "MLA: per-layer KV shapes, scaled embeddings and residuals"),
    Arch("glm4-moe-lite", "Glm4MoeLiteConfig",
         dict(MLA, q_lora_rank=None, v_head_dim=32, n_routed_experts=4, num_experts_per_tok=2,
              moe_intermediate_size=32, mlp_layer_types=["dense", "dense"]),
         "MLA: per-layer KV shapes (values wider than keys)"),
    # hybrids: layers with recurrent or convolution state (gated delta rule, Mamba-2, short
    # convolutions), state chunks of 16 so that the prompts run across several
    Arch("qwen3.5", "Qwen3_5TextConfig",
         dict(HEAD16, layer_types=["linear_attention", "full_attention"], **DELTA),
         "hybrid: gated delta rule (grouped value heads), conv state"),
    Arch("qwen3-next", "Qwen3NextConfig",
         dict(HEAD16, layer_types=["linear_attention", "full_attention"], num_experts=2,
              num_experts_per_tok=1, moe_intermediate_size=32,
              shared_expert_intermediate_size=32, **DELTA),
         "hybrid: gated delta rule, mixture of experts", dtype=torch.float32),
    Arch("olmo-hybrid", "OlmoHybridConfig",
         dict(COMMON, layer_types=["linear_attention", "full_attention"], **DELTA),
         "hybrid: gated delta rule"),
    Arch("lfm2", "Lfm2Config",
         dict(COMMON, layer_types=["conv", "full_attention"], full_attn_idxs=[1]),
         "hybrid: short convolution layers"),
    Arch("nemotron-h", "NemotronHConfig",
         dict(HEAD16, num_hidden_layers=3, layers_block_type=["mamba", "attention", "mlp"],
              mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16, n_groups=2,
              mamba_d_conv=4, chunk_size=16),
         "hybrid: Mamba-2, an MLP-only layer"),
    Arch("falcon-h1", "FalconH1Config",
         dict(HEAD16, mamba_n_heads=4, mamba_d_head=16, mamba_d_ssm=64, mamba_d_state=16,
              mamba_n_groups=2, mamba_chunk_size=16),
         "hybrid: Mamba-2 beside attention in every layer"),
    Arch("bamba", "BambaConfig", dict(COMMON, attn_layer_indices=[1], **MAMBA2),
         "hybrid: Mamba-2"),
    Arch("granite-hybrid", "GraniteMoeHybridConfig",
         dict(COMMON, layer_types=["mamba", "attention"], num_local_experts=2,
              num_experts_per_tok=1, shared_intermediate_size=64, **MAMBA2),
         "hybrid: Mamba-2, mixture of experts", dtype=torch.float32),
    # refused, each with the reason it must name
    Arch("jamba", "JambaConfig",
         dict(COMMON, attn_layer_period=2, attn_layer_offset=1, num_experts=1,
              mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, use_mamba_kernels=False),
         "hybrid: Mamba-1 (its scan drops a past state)", refused="recurrent-state"),
    Arch("llama4-tuned", "Llama4TextConfig",
         dict(LLAMA4, attn_temperature_tuning=True), "attention temperature tuning", refused="attention scaling",
         model="Llama4ForCausalLM", dtype=torch.float32),
    Arch("phi3-longrope", "Phi3Config",
         dict(COMMON, original_max_position_embeddings=64,
              rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 8,
                            "long_factor": [4.0] * 8, "original_max_position_embeddings": 64}),
         "RoPE frequencies from the sequence length", refused="RoPE scaling 'longrope'"),
    Arch("deepseek-v3.2", "DeepseekV32Config",
         dict(MLA, q_lora_rank=24, v_head_dim=12, n_routed_experts=4, num_experts_per_tok=2,
              moe_intermediate_size=32, first_k_dense_replace=2, index_head_dim=16,
              index_n_heads=2, index_topk=8),
         "sparse attention (DSA indexer)", refused="DSA"),
    Arch("bloom", "BloomConfig",
         dict(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4, bos_token_id=None,
              eos_token_id=None, pad_token_id=None), "ALiBi", refused="ALiBi"),
    Arch("falcon", "FalconConfig",
         dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              bos_token_id=None, eos_token_id=None), "its own attention path",
         refused="bypass"),
    Arch("stablelm", "StableLmConfig",
         dict(COMMON, num_key_value_heads=4), "its own attention path", refused="bypass"),
]
BY_NAME = {a.name: a for a in ARCHS}
SUPPORTED = [a for a in ARCHS if a.refused is None]
REFUSED = [a for a in ARCHS if a.refused is not None]


@torch.no_grad()
def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """The model alone, greedy, each step a full forward with its own eager attention (no
    cache: nothing of ours on the path)."""
    from specedge.execution.support import reference_logits

    ids = list(prompt)
    for _ in range(n):
        ids.append(int(reference_logits(model, ids)[-1].argmax()))
    return ids[len(prompt):]
