"""A zoo of tiny Hugging Face architectures for the every-architecture tests.

Each ``Arch`` names a transformers config and model class, the explicit keyword arguments of a
tiny config (2 layers, 2-4 heads, width 32, a 99-token vocabulary, a large ``initializer_range``
so attention is far from uniform) and the kind of inputs the family takes. ``build()`` makes a
fresh config every time (``_from_config`` mutates the config it is given), builds the model in
``eager`` (the reference: transformers' own softmax, returned by ``output_attentions``), and
makes inputs with padding wherever the family takes an attention mask.

How the candidates were chosen: every model type in ``transformers.models.auto``'s
``MODEL_MAPPING_NAMES`` whose modeling file dispatches through ``ALL_ATTENTION_FUNCTIONS``
(465 in transformers 5.24), one or more per family and per attention feature (GQA/MQA, sliding
window, soft-capping, MoE, learned sinks, relative position bias, hybrid linear/attention
stacks, shared layers, encoder–decoder, vision, audio). ``SKIPPED`` lists what was left out on
purpose and why; ``VERSION_DEPENDENT`` the architectures that reach ``AttentionInterface`` in some
transformers releases only;
``PARTLY_DISPATCHED`` models with hand-written attention beside dispatching modules.
``tests/arch_scan.py`` runs the same check over the whole registry with generic configs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

VOCAB = 99
INIT = 0.2
BATCH, SEQ, DEC_SEQ = 2, 10, 7

# --------------------------------------------------------------------------- config families
# Shared keyword sets: each entry below copies one and says what it changes.
LLAMA_LIKE = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, initializer_range=INIT, pad_token_id=0,
    bos_token_id=1, eos_token_id=2,
)
MHA_DECODER = {**LLAMA_LIKE, "num_key_value_heads": 4}
BERT_LIKE = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    max_position_embeddings=64, initializer_range=INIT, pad_token_id=0,
    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
)
BART_LIKE = dict(
    vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
    decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
    init_std=INIT, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
)
T5_LIKE = dict(
    vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
    relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
    initializer_factor=1.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)
VIT_LIKE = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
    patch_size=8, num_channels=3, initializer_range=INIT, hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
WAV2VEC2_LIKE = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=2, initializer_range=INIT, hidden_dropout=0.0, attention_dropout=0.0,
    activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0, vocab_size=VOCAB,
    mask_time_prob=0.0, mask_feature_prob=0.0,
)


@dataclass
class Arch:
    """One tiny architecture: what to build and what to feed it."""

    name: str  # transformers model_type
    category: str
    config_class: str
    model_class: str
    config: dict
    inputs: str  # "text", "text_unpadded", "seq2seq", "pixels", "audio_values", "audio_features", ...
    note: str = ""
    input_options: dict = field(default_factory=dict)
    # Parameters (by name suffix) redrawn from N(0, 1) after building: learned sinks start at 0,
    # where a test could not tell a sink that is used from one that is dropped.
    redraw: tuple[str, ...] = ()
    # How each of the eager output's attention lists is keyed by the seam: list name -> (stack, kind),
    # or None for a list whose attention does not dispatch (not compared; named in ``note``).
    sites: dict = field(default_factory=dict)
    # The captured layers an eager list reports, where it reports only some (Swin: a stage's last block).
    reported_layers: dict = field(default_factory=dict)
    # Attention calls the seam sees that eager output_attentions does not report (SigLIP's head).
    extra_sites: int = 0
    # Eager reports the softmax without the learned sink (and rescales the output instead): the
    # captured weights, which leave the sink its share, are compared after renormalising.
    eager_weights_exclude_sink: bool = False
    # Looped models: eager's one list holds every pass of every stack in call order; the capture
    # is compared with it in call order (each pass a site of its own).
    in_call_order: bool = False

    def missing(self) -> str | None:
        """Why the installed transformers cannot build this architecture (an older release), or None."""
        import transformers

        absent = [c for c in (self.config_class, self.model_class) if not hasattr(transformers, c)]
        return f"transformers {transformers.__version__} has no {', '.join(absent)}" if absent else None

    def build(self, attn_implementation: str = "eager"):
        import transformers

        torch.manual_seed(0)
        cfg = getattr(transformers, self.config_class)(**copy.deepcopy(self.config))
        model_cls = getattr(transformers, self.model_class)
        model = model_cls._from_config(cfg, attn_implementation=attn_implementation).eval()
        if self.redraw:
            g = torch.Generator().manual_seed(3)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name.endswith(self.redraw):
                        p.copy_(torch.randn(p.shape, generator=g))
        return model, make_inputs(self.inputs, model.config, **self.input_options)


def _ids(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, shape, generator=g)


def _right_padded(batch: int, length: int, pad: int = 2) -> torch.Tensor:
    """The last row ends ``pad`` positions early: right padding leaves every query a visible key."""
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length - pad:] = 0
    return mask


def make_inputs(kind: str, cfg, **options) -> dict:
    g = torch.Generator().manual_seed(1)
    if kind == "text":
        inputs = {"input_ids": _ids(BATCH, SEQ, seed=0), "attention_mask": _right_padded(BATCH, SEQ)}
        if "use_cache" in options:  # recurrent models whose cache has fewer layers than their calls
            inputs["use_cache"] = options["use_cache"]
        return inputs
    if kind == "text_unpadded":
        return {"input_ids": _ids(BATCH, SEQ, seed=0)}
    if kind == "seq2seq":
        return {
            "input_ids": _ids(BATCH, SEQ, seed=0),
            "attention_mask": _right_padded(BATCH, SEQ),
            "decoder_input_ids": _ids(BATCH, DEC_SEQ, seed=2),
        }
    if kind == "pixels":
        size = options.get("size", 32)
        return {"pixel_values": torch.randn(BATCH, 3, size, size, generator=g)}
    if kind == "audio_values":
        return {"input_values": torch.randn(BATCH, options.get("samples", 800), generator=g)}
    if kind == "audio_values_padded":
        samples = options.get("samples", 800)
        mask = torch.ones(BATCH, samples, dtype=torch.long)
        mask[-1, samples // 2:] = 0
        return {"input_values": torch.randn(BATCH, samples, generator=g), "attention_mask": mask}
    if kind == "audio_features":  # (B, features, frames): Whisper-style log-mel input
        frames = options["frames"]
        inputs = {"input_features": torch.randn(BATCH, options["features"], frames, generator=g)}
        if options.get("decoder", True):
            inputs["decoder_input_ids"] = _ids(BATCH, DEC_SEQ, seed=2)
        return inputs
    if kind == "audio_frames":  # (B, frames, features): conformer-style feature input, padded
        frames = options["frames"]
        mask = torch.ones(BATCH, frames, dtype=torch.long)
        mask[-1, frames - 3:] = 0
        return {"input_features": torch.randn(BATCH, frames, options["features"], generator=g), "attention_mask": mask}
    if kind == "speech_seq2seq":  # raw audio into an encoder, token ids into a decoder (Moonshine)
        return {"input_values": torch.randn(BATCH, options["samples"], generator=g),
                "decoder_input_ids": _ids(BATCH, DEC_SEQ, seed=2)}
    raise ValueError(f"unknown input kind {kind!r}")


def _a(name, category, config_class, model_class, config, inputs="text", note="", *, redraw=(), sites=None,
       reported_layers=None, extra_sites=0, eager_weights_exclude_sink=False, in_call_order=False,
       **input_options) -> Arch:
    return Arch(name, category, config_class, model_class, config, inputs, note, input_options, tuple(redraw),
                sites or {}, reported_layers or {}, extra_sites, eager_weights_exclude_sink, in_call_order)


# --------------------------------------------------------------------------- the zoo
ZOO: list[Arch] = [
    # ---- decoder-only, one key/value head per query head
    _a("gpt2", "decoder", "GPT2Config", "GPT2Model",
       dict(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, initializer_range=INIT,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0)),
    _a("gpt_neox", "decoder", "GPTNeoXConfig", "GPTNeoXModel",
       dict(MHA_DECODER, hidden_dropout=0.0, attention_dropout=0.0)),
    _a("gptj", "decoder", "GPTJConfig", "GPTJModel",
       dict(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
            initializer_range=INIT, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0)),
    _a("codegen", "decoder", "CodeGenConfig", "CodeGenModel",
       dict(vocab_size=VOCAB, n_positions=64, n_ctx=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
            initializer_range=INIT, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0)),
    _a("opt", "decoder", "OPTConfig", "OPTModel",
       dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
            word_embed_proj_dim=32, max_position_embeddings=64, init_std=INIT, dropout=0.0,
            attention_dropout=0.0, pad_token_id=1)),
    _a("biogpt", "decoder", "BioGptConfig", "BioGptModel", dict(BERT_LIKE)),
    _a("phi", "decoder", "PhiConfig", "PhiModel", dict(MHA_DECODER, partial_rotary_factor=0.5)),
    _a("stablelm", "decoder", "StableLmConfig", "StableLmModel", dict(MHA_DECODER)),
    _a("persimmon", "decoder", "PersimmonConfig", "PersimmonModel", dict(MHA_DECODER)),
    _a("olmo", "decoder", "OlmoConfig", "OlmoModel", dict(MHA_DECODER)),
    _a("cohere", "decoder", "CohereConfig", "CohereModel", dict(LLAMA_LIKE)),
    _a("diffllama", "decoder", "DiffLlamaConfig", "DiffLlamaModel", dict(LLAMA_LIKE),
       note="differential attention: each layer calls attention twice (same Q/K, two value halves); "
       "the second call is a site of its own, pass 2, which eager does not report", extra_sites=2),
    _a("hrm_text", "looped", "HrmTextConfig", "HrmTextModel",
       dict(LLAMA_LIKE, num_key_value_heads=4, head_dim=8, num_hidden_layers=4, num_layers_per_stack=2),
       note="hierarchical recurrence: each layer's attention runs once per cycle (16 calls, 4 modules)",
       in_call_order=True, use_cache=False),
    _a("dory", "looped", "DoryConfig", "DoryModel",
       dict(LLAMA_LIKE, head_dim=8, num_hidden_layers=3, n_input_layers=1, n_recurrent_layers=1, n_output_layers=1,
            n_recurrent_loops=2, sliding_window=4),
       note="a recurrent middle layer run twice", in_call_order=True),
    # ---- grouped-query and multi-query attention
    _a("llama", "gqa", "LlamaConfig", "LlamaModel", dict(LLAMA_LIKE)),
    _a("qwen2", "gqa", "Qwen2Config", "Qwen2Model", dict(LLAMA_LIKE)),
    _a("qwen3", "gqa", "Qwen3Config", "Qwen3Model", dict(LLAMA_LIKE, head_dim=8), note="QK-norm"),
    _a("phi3", "gqa", "Phi3Config", "Phi3Model", dict(LLAMA_LIKE)),
    _a("granite", "gqa", "GraniteConfig", "GraniteModel", dict(LLAMA_LIKE, attention_multiplier=0.5),
       note="scale from attention_multiplier, not 1/sqrt(d)"),
    _a("olmo2", "gqa", "Olmo2Config", "Olmo2Model", dict(LLAMA_LIKE)),
    _a("glm", "gqa", "GlmConfig", "GlmModel", dict(LLAMA_LIKE, head_dim=8)),
    _a("helium", "gqa", "HeliumConfig", "HeliumModel", dict(LLAMA_LIKE, head_dim=8)),
    _a("smollm3", "gqa", "SmolLM3Config", "SmolLM3Model", dict(LLAMA_LIKE), note="NoPE on some layers"),
    _a("seed_oss", "gqa", "SeedOssConfig", "SeedOssModel", dict(LLAMA_LIKE, head_dim=8)),
    _a("ernie4_5", "gqa", "Ernie4_5Config", "Ernie4_5Model", dict(LLAMA_LIKE, head_dim=8)),
    _a("bitnet", "gqa", "BitNetConfig", "BitNetModel", dict(LLAMA_LIKE)),
    _a("starcoder2", "gqa", "Starcoder2Config", "Starcoder2Model", dict(LLAMA_LIKE, residual_dropout=0.0)),
    _a("gemma", "gqa", "GemmaConfig", "GemmaModel", dict(LLAMA_LIKE, num_key_value_heads=1, head_dim=8),
       note="multi-query: one key/value head"),
    _a("gpt_bigcode", "gqa", "GPTBigCodeConfig", "GPTBigCodeModel",
       dict(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, multi_query=True,
            initializer_range=INIT, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0),
       note="multi-query"),
    _a("deepseek_v3", "gqa", "DeepseekV3Config", "DeepseekV3Model",
       dict(LLAMA_LIKE, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4,
            qk_nope_head_dim=4, v_head_dim=8, head_dim=4, moe_intermediate_size=16, n_routed_experts=4,
            num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1),
       note="multi-head latent attention (value head dim differs from query's), MoE"),
    # ---- sliding window (alone, or interleaved with global layers)
    _a("mistral", "sliding_window", "MistralConfig", "MistralModel", dict(LLAMA_LIKE, sliding_window=4)),
    _a("gemma3_text", "sliding_window", "Gemma3TextConfig", "Gemma3TextModel",
       dict(LLAMA_LIKE, head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
       note="local/global layers, QK-norm"),
    _a("cohere2", "sliding_window", "Cohere2Config", "Cohere2Model",
       dict(LLAMA_LIKE, sliding_window=4, layer_types=["sliding_attention", "full_attention"])),
    _a("exaone4", "sliding_window", "Exaone4Config", "Exaone4Model",
       dict(LLAMA_LIKE, sliding_window=4, layer_types=["sliding_attention", "full_attention"])),
    _a("llama4_text", "sliding_window", "Llama4TextConfig", "Llama4TextModel",
       dict(LLAMA_LIKE, head_dim=8, num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=64,
            attention_chunk_size=4, no_rope_layers=[1, 0], moe_layers=[1]),
       note="chunked attention (blocks of 4) on RoPE layers, global NoPE layers, MoE"),
    _a("modernbert", "sliding_window", "ModernBertConfig", "ModernBertModel",
       dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, initializer_range=INIT, local_attention=4, global_attn_every_n_layers=2,
            pad_token_id=0, attention_dropout=0.0, embedding_dropout=0.0, mlp_dropout=0.0),
       note="bidirectional encoder with a local-window layer"),
    # ---- logit soft-capping
    _a("gemma2", "softcap", "Gemma2Config", "Gemma2Model",
       dict(LLAMA_LIKE, head_dim=8, sliding_window=4, attn_logit_softcapping=2.0, final_logit_softcapping=None),
       note="soft-cap 2.0 (low so it bites), sliding window"),
    _a("vaultgemma", "softcap", "VaultGemmaConfig", "VaultGemmaModel",
       dict(LLAMA_LIKE, head_dim=8, sliding_window=4, attn_logit_softcapping=2.0, final_logit_softcapping=None)),
    # ---- mixture of experts
    _a("mixtral", "moe", "MixtralConfig", "MixtralModel",
       dict(LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2, sliding_window=4)),
    _a("qwen2_moe", "moe", "Qwen2MoeConfig", "Qwen2MoeModel",
       dict(LLAMA_LIKE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            shared_expert_intermediate_size=32)),
    _a("qwen3_moe", "moe", "Qwen3MoeConfig", "Qwen3MoeModel",
       dict(LLAMA_LIKE, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)),
    _a("olmoe", "moe", "OlmoeConfig", "OlmoeModel", dict(LLAMA_LIKE, num_experts=4, num_experts_per_tok=2)),
    _a("granitemoe", "moe", "GraniteMoeConfig", "GraniteMoeModel",
       dict(LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2)),
    _a("phimoe", "moe", "PhimoeConfig", "PhimoeModel",
       dict(LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    _a("jetmoe", "moe", "JetMoeConfig", "JetMoeModel",
       dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_key_value_heads=2, kv_channels=8,
            intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
            initializer_range=INIT, pad_token_id=0), note="mixture of attention heads"),
    _a("glm4_moe", "moe", "Glm4MoeConfig", "Glm4MoeModel",
       dict(LLAMA_LIKE, head_dim=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            first_k_dense_replace=1, n_group=1, topk_group=1)),
    # ---- learned attention sinks
    _a("gpt_oss", "sinks", "GptOssConfig", "GptOssModel",
       dict(LLAMA_LIKE, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
            layer_types=["sliding_attention", "full_attention"]),
       note="per-head sink logit passed as s_aux", redraw=("sinks",)),
    _a("granite_swa", "sinks", "GraniteSWAConfig", "GraniteSWAModel", dict(LLAMA_LIKE, sliding_window=4),
       note="s_aux sink; its eager weights leave the sink out (the output is rescaled instead)", redraw=("sinks",),
       eager_weights_exclude_sink=True),
    _a("mimo_v2_flash", "sinks", "MiMoV2FlashConfig", "MiMoV2FlashModel",
       dict(LLAMA_LIKE, head_dim=8, v_head_dim=8, sliding_window=4, n_routed_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=16),
       note="s_aux sink on the sliding layer only, value head dim from v_head_dim", redraw=("sinks",)),
    _a("inkling2_text", "sinks", "Inkling2TextConfig", "Inkling2TextModel",
       dict(LLAMA_LIKE, head_dim=8, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8,
            sliding_window_size=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
       note="per-token sink logits passed as sinks=; attention over depth (block attention residuals) "
       "dispatches too, unreported by eager", extra_sites=4),
    _a("inkling_text", "relative_bias", "InklingTextConfig", "InklingTextModel",
       dict(LLAMA_LIKE, head_dim=8, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8,
            sliding_window_size=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            n_shared_experts=1),
       note="decoder with a relative position bias passed as position_bias"),
    # ---- hybrid stacks: attention layers between linear-recurrent / state-space layers
    _a("falcon_h1", "hybrid", "FalconH1Config", "FalconH1Model",
       dict(LLAMA_LIKE, head_dim=8, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8,
            mamba_n_groups=1, mamba_chunk_size=8), note="attention and Mamba side by side in every layer"),
    _a("lfm2", "hybrid", "Lfm2Config", "Lfm2Model",
       dict(LLAMA_LIKE, layer_types=["conv", "full_attention"]), note="layer 0 convolution, layer 1 attention"),
    _a("nemotron_h", "hybrid", "NemotronHConfig", "NemotronHModel",
       dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            intermediate_size=64, layers_block_type=["mamba", "attention", "mlp"], mamba_num_heads=4,
            mamba_head_dim=8, ssm_state_size=8, n_groups=1, chunk_size=8, initializer_range=INIT, pad_token_id=0),
       note="Mamba, attention and MLP layers"),
    _a("jamba", "hybrid", "JambaConfig", "JambaModel",
       dict(LLAMA_LIKE, num_experts=4, num_experts_per_tok=2, attn_layer_period=2, attn_layer_offset=1,
            expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
            mamba_dt_rank=4, use_mamba_kernels=False),
       note="Mamba layer, then attention with MoE", use_cache=False),
    _a("bamba", "hybrid", "BambaConfig", "BambaModel",
       dict(LLAMA_LIKE, mamba_n_heads=8, mamba_d_head=8, mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=8,
            mamba_expand=2, attn_layer_indices=[1]), use_cache=False),
    _a("qwen3_next", "hybrid", "Qwen3NextConfig", "Qwen3NextModel",
       dict(LLAMA_LIKE, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            shared_expert_intermediate_size=16, linear_num_value_heads=4, linear_num_key_heads=2,
            linear_key_head_dim=8, linear_value_head_dim=8, layer_types=["linear_attention", "full_attention"]),
       note="gated delta-net layer, then gated attention", use_cache=False),
    _a("recurrent_gemma", "hybrid", "RecurrentGemmaConfig", "RecurrentGemmaModel",
       dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=1, lru_width=32, attention_window_size=4, block_types=["recurrent", "attention"],
            pad_token_id=0, initializer_range=INIT),
       note="RG-LRU recurrence and local multi-query attention", use_cache=False),
    # ---- encoders
    _a("bert", "encoder", "BertConfig", "BertModel", dict(BERT_LIKE)),
    _a("roberta", "encoder", "RobertaConfig", "RobertaModel", dict(BERT_LIKE, pad_token_id=1)),
    _a("xlm-roberta", "encoder", "XLMRobertaConfig", "XLMRobertaModel", dict(BERT_LIKE, pad_token_id=1)),
    _a("camembert", "encoder", "CamembertConfig", "CamembertModel", dict(BERT_LIKE, pad_token_id=1)),
    _a("electra", "encoder", "ElectraConfig", "ElectraModel", dict(BERT_LIKE, embedding_size=16)),
    _a("ernie", "encoder", "ErnieConfig", "ErnieModel", dict(BERT_LIKE)),
    _a("splinter", "encoder", "SplinterConfig", "SplinterModel", dict(BERT_LIKE)),
    _a("layoutlm", "encoder", "LayoutLMConfig", "LayoutLMModel", dict(BERT_LIKE, max_2d_position_embeddings=64, initializer_range=0.5)),
    _a("distilbert", "encoder", "DistilBertConfig", "DistilBertModel",
       dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64,
            initializer_range=INIT, dropout=0.0, attention_dropout=0.0, pad_token_id=0)),
    _a("mobilebert", "encoder", "MobileBertConfig", "MobileBertModel",
       dict(BERT_LIKE, embedding_size=16, true_hidden_size=16, intra_bottleneck_size=16, num_feedforward_networks=1,
            initializer_range=0.5),
       note="bottleneck: query/key from a narrower projection than value"),
    _a("albert", "encoder", "AlbertConfig", "AlbertModel",
       dict(BERT_LIKE, embedding_size=16, num_hidden_groups=1),
       note="one layer's weights shared by both layers: one module called twice"),
    _a("esm", "encoder", "EsmConfig", "EsmModel",
       dict(BERT_LIKE, pad_token_id=1, mask_token_id=32, position_embedding_type="rotary"),
       note="rotary positions in an encoder"),
    _a("nomic_bert", "encoder", "NomicBertConfig", "NomicBertModel", dict(BERT_LIKE)),
    _a("eurobert", "encoder", "EuroBertConfig", "EuroBertModel", dict(LLAMA_LIKE)),
    # ---- encoder-decoder
    _a("bart", "encoder_decoder", "BartConfig", "BartModel", dict(BART_LIKE), "seq2seq"),
    _a("mbart", "encoder_decoder", "MBartConfig", "MBartModel", dict(BART_LIKE), "seq2seq"),
    _a("marian", "encoder_decoder", "MarianConfig", "MarianModel", dict(BART_LIKE, decoder_vocab_size=VOCAB), "seq2seq"),
    _a("pegasus", "encoder_decoder", "PegasusConfig", "PegasusModel", dict(BART_LIKE), "seq2seq"),
    _a("m2m_100", "encoder_decoder", "M2M100Config", "M2M100Model", dict(BART_LIKE), "seq2seq"),
    _a("blenderbot", "encoder_decoder", "BlenderbotConfig", "BlenderbotModel", dict(BART_LIKE), "seq2seq"),
    _a("plbart", "encoder_decoder", "PLBartConfig", "PLBartModel", dict(BART_LIKE), "seq2seq"),
    _a("bigbird_pegasus", "encoder_decoder", "BigBirdPegasusConfig", "BigBirdPegasusModel",
       dict(BART_LIKE, attention_type="original_full"), "seq2seq",
       note="eager-only; its encoder's full attention is hand-written (does not dispatch) and adds the mask "
       "to its own scores", sites={"encoder_attentions": None}),
    _a("nllb-moe", "moe", "NllbMoeConfig", "NllbMoeModel",
       dict(BART_LIKE, num_experts=4, expert_capacity=8, router_ignore_padding_tokens=False,
            sparse_step=1), "seq2seq",
       note="encoder-decoder MoE whose router reads the attention mask as padding"),
    _a("t5", "encoder_decoder", "T5Config", "T5Model", dict(T5_LIKE), "seq2seq", note="relative position bias"),
    _a("mt5", "encoder_decoder", "MT5Config", "MT5Model", dict(T5_LIKE), "seq2seq", note="relative position bias"),
    _a("umt5", "encoder_decoder", "UMT5Config", "UMT5Model", dict(T5_LIKE), "seq2seq",
       note="relative position bias in every layer"),
    _a("longt5", "encoder_decoder", "LongT5Config", "LongT5Model",
       dict(T5_LIKE, encoder_attention_type="local", local_radius=4), "seq2seq",
       note="relative position bias; its local-attention encoder is hand-written (does not dispatch)",
       sites={"encoder_attentions": None}),
    _a("switch_transformers", "moe", "SwitchTransformersConfig", "SwitchTransformersModel",
       dict(T5_LIKE, num_experts=4, expert_capacity=16, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1),
       "seq2seq", note="T5-style MoE, relative position bias"),
    _a("t5gemma", "softcap", "T5GemmaConfig", "T5GemmaModel",
       dict(encoder=dict(LLAMA_LIKE, head_dim=8, sliding_window=4, attn_logit_softcapping=2.0,
                         final_logit_softcapping=None),
            decoder=dict(LLAMA_LIKE, head_dim=8, sliding_window=4, attn_logit_softcapping=2.0,
                         final_logit_softcapping=None),
            vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2),
       "seq2seq", note="encoder-decoder with soft-capping and sliding window"),
    _a("whisper", "encoder_decoder", "WhisperConfig", "WhisperModel",
       dict(vocab_size=VOCAB, num_mel_bins=16, d_model=32, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
            max_source_positions=16, max_target_positions=32, init_std=INIT, dropout=0.0, attention_dropout=0.0,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, begin_suppress_tokens=None,
            suppress_tokens=None),
       "audio_features", note="speech encoder-decoder", features=16, frames=32),
    _a("moonshine", "encoder_decoder", "MoonshineConfig", "MoonshineModel",
       dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, encoder_num_hidden_layers=2,
            decoder_num_hidden_layers=2, encoder_num_attention_heads=4, decoder_num_attention_heads=4,
            encoder_num_key_value_heads=4, decoder_num_key_value_heads=2, max_position_embeddings=64,
            initializer_range=INIT, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1),
       "speech_seq2seq", note="speech encoder-decoder, GQA decoder", samples=2000),
    # ---- vision
    _a("vit", "vision", "ViTConfig", "ViTModel", dict(VIT_LIKE), "pixels"),
    _a("deit", "vision", "DeiTConfig", "DeiTModel", dict(VIT_LIKE), "pixels"),
    _a("dinov2", "vision", "Dinov2Config", "Dinov2Model", dict(VIT_LIKE), "pixels"),
    _a("ijepa", "vision", "IJepaConfig", "IJepaModel", dict(VIT_LIKE), "pixels"),
    _a("vit_msn", "vision", "ViTMSNConfig", "ViTMSNModel", dict(VIT_LIKE), "pixels"),
    _a("beit", "vision", "BeitConfig", "BeitModel", dict(VIT_LIKE, use_relative_position_bias=True), "pixels",
       note="relative position bias folded into the mask"),
    _a("dinov3_vit", "vision", "DINOv3ViTConfig", "DINOv3ViTModel", dict(VIT_LIKE, num_register_tokens=2), "pixels",
       note="register tokens, 2-D rotary positions"),
    _a("pixtral", "vision", "PixtralVisionConfig", "PixtralVisionModel",
       dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
            patch_size=8, head_dim=8, initializer_range=INIT), "pixels"),
    _a("swin", "vision", "SwinConfig", "SwinModel",
       dict(image_size=32, patch_size=2, embed_dim=16, depths=[2], num_heads=[2], window_size=4,
            initializer_range=INIT, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0),
       "pixels", note="windowed attention; the shifted block's mask is -100 across windows, plus a relative "
       "position bias; eager reports only a stage's last block", reported_layers={"attentions": [1]}, extra_sites=1),
    _a("clip_vision_model", "vision", "CLIPVisionConfig", "CLIPVisionModel",
       dict(VIT_LIKE, attention_dropout=0.0, initializer_factor=2.0), "pixels"),
    _a("siglip_vision_model", "vision", "SiglipVisionConfig", "SiglipVisionModel",
       dict(VIT_LIKE, attention_dropout=0.0, vision_use_head=True), "pixels",
       note="HF layers plus an nn.MultiheadAttention pooling head",
       sites={"attentions": ("encoder", "self")}, extra_sites=1),
    # ---- audio encoders
    _a("wav2vec2", "audio", "Wav2Vec2Config", "Wav2Vec2Model", dict(WAV2VEC2_LIKE), "audio_values"),
    _a("hubert", "audio", "HubertConfig", "HubertModel", dict(WAV2VEC2_LIKE), "audio_values"),
    _a("wav2vec2-conformer", "audio", "Wav2Vec2ConformerConfig", "Wav2Vec2ConformerModel",
       dict(WAV2VEC2_LIKE, position_embeddings_type="relative", conv_depthwise_kernel_size=3),
       "audio_values", note="relative position bias passed as position_bias"),
    _a("wav2vec2-bert", "audio", "Wav2Vec2BertConfig", "Wav2Vec2BertModel",
       dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            feature_projection_input_dim=16, initializer_range=INIT, hidden_dropout=0.0, attention_dropout=0.0,
            activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0, conv_depthwise_kernel_size=3,
            left_max_position_embeddings=8, right_max_position_embeddings=4, position_embeddings_type="relative_key",
            vocab_size=VOCAB),
       "audio_frames", note="relative-key position bias passed as position_bias, padded frames", features=16, frames=12),
]


def by_name(name: str) -> Arch:
    for arch in ZOO:
        if arch.name == name:
            return arch
    raise KeyError(name)


# Architectures whose attention was hand-written in some transformers release and dispatches
# through AttentionInterface in another (Falcon from 5.25 on): what the test expects follows the
# installed release, as ``dispatches`` finds it by running the model. Those that dispatch are
# checked as the zoo is (captured maps equal eager's); the others must be refused by attach.
VERSION_DEPENDENT: list[Arch] = [
    _a("gpt_neo", "decoder", "GPTNeoConfig", "GPTNeoModel",
       dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
            max_position_embeddings=64, window_size=4, initializer_range=INIT, resid_dropout=0.0, embed_dropout=0.0,
            attention_dropout=0.0, pad_token_id=0)),
    _a("bloom", "alibi", "BloomConfig", "BloomModel",
       dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, initializer_range=INIT, pad_token_id=0)),
    _a("falcon", "alibi", "FalconConfig", "FalconModel",
       dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True,
            initializer_range=INIT, pad_token_id=0), note="ALiBi"),
    _a("falcon_rotary", "gqa", "FalconConfig", "FalconModel",
       dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
            new_decoder_architecture=True, initializer_range=INIT, pad_token_id=0),
       note="RoPE, grouped key/value heads (the 7B/40B layout)"),
    _a("mpt", "alibi", "MptConfig", "MptModel",
       dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, initializer_range=INIT,
            pad_token_id=0)),
    _a("deberta-v2", "encoder", "DebertaV2Config", "DebertaV2Model", dict(BERT_LIKE)),
    _a("xglm", "decoder", "XGLMConfig", "XGLMModel",
       dict(vocab_size=VOCAB, d_model=32, num_layers=2, attention_heads=4, ffn_dim=64, init_std=INIT,
            dropout=0.0, attention_dropout=0.0, pad_token_id=1)),
    _a("sam_vision_model", "vision", "SamVisionConfig", "SamVisionModel",
       dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_dim=64, image_size=32, patch_size=8,
            output_channels=16, window_size=2, global_attn_indexes=[1], num_pos_feats=8, initializer_range=INIT),
       "pixels"),
]


class _Dispatched(Exception):
    pass


def _stop(*_args, **_kwargs):
    raise _Dispatched


def dispatches(model, inputs: dict) -> bool:
    """Whether the installed transformers routes ``model``'s attention through AttentionInterface:
    one forward with a function of its own registered there, which stops the forward at its first
    call. Independent of how attnkit finds attention; the model is switched back afterwards."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register("zoo_probe", _stop)
    AttentionMaskInterface.register("zoo_probe", ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["sdpa"])
    previous = model.config._attn_implementation
    model.set_attn_implementation("zoo_probe")  # a model that cannot switch keeps its own attention
    try:
        with torch.no_grad():
            model(**inputs)
    except _Dispatched:
        return True
    finally:
        model.set_attn_implementation(previous)
    return False


# Left out of ZOO, with the reason (README lists them too).
SKIPPED: dict[str, str] = {
    "markuplm": "attention stays near uniform at any initializer_range (0.16 max weight), so a capture "
                "comparison would not mean anything; its -10000 mask is covered by Swin's -100",
    "minimax": "eager output_attentions reports the linear-attention layers' non-probability weights beside "
               "the softmax layer's",
    "vit_mae": "draws fresh random patch masking on every forward (not a seam matter)",
    "t5gemma2": "no tiny configuration: its default builds 26 layers per stack",
}


def _git_text():
    """GIT on token ids only: its text layers are GitSelfAttention (hand-written eager), its
    vision tower (not run without pixels) dispatches."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GitConfig(**BERT_LIKE, vision_config=dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8))
    model = transformers.GitModel._from_config(cfg, attn_implementation="eager").eval()
    return model, make_inputs("text", model.config)


def _sam_vision():
    """SAM's vision encoder picks SamVisionAttention at construction (no AttentionInterface); the
    full model's mask decoder dispatches."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.SamConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_dim=64, image_size=64,
                           patch_size=8, output_channels=16, window_size=4, global_attn_indexes=[1],
                           num_pos_feats=8),
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_dim=32,
                                 iou_head_hidden_dim=16),
    )
    model = transformers.SamModel._from_config(cfg, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(1)
    return model, {"pixel_values": torch.randn(1, 3, 64, 64, generator=g),
                   "input_points": torch.tensor([[[[10.0, 20.0]]]])}


def _variant(name: str, **changes):
    """A zoo entry's model with some config fields changed (another attention type of the family)."""
    def build():
        arch = by_name(name)
        return Arch(**{**arch.__dict__, "config": {**arch.config, **changes}}).build()
    return build


# Attention partly hand-written: (builder, a class attach must name as not seen). The encoders of
# LongT5 (local, transient-global) and BigBird-Pegasus (full, block-sparse) are the zoo's own
# entries and these variants: their matmul + softmax attention is not seen, their decoders are.
PARTLY_DISPATCHED = {
    "git_text": (_git_text, "GitSelfAttention"),
    "sam_vision": (_sam_vision, "SamVisionAttention"),
    "longt5_transient_global": (_variant("longt5", encoder_attention_type="transient-global"),
                                "LongT5TransientGlobalAttention"),
    "bigbird_pegasus_block_sparse": (_variant("bigbird_pegasus", attention_type="block_sparse", block_size=1,
                                              num_random_blocks=1), "BigBirdPegasusBlockSparseAttention"),
}


def enable_checkpointing(model, use_reentrant: bool) -> None:
    """Activation checkpointing by the name this transformers knows (5.25 renamed
    ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``; the old name warns)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
