"""The `model:` section of an experiment config.

Each part of the composed model is a component family (modules/components/*), chosen by
``name`` and sized by its own typed config. Widths that follow from other parts (a projector's
in/out dims, the VAR decoder's codebook size) are filled in when the model is built, so a YAML
states each size once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from modules.components.classifier import ClassifierConfig
from modules.components.llm import LLMConfig
from modules.components.projectors import ProjectorConfig
from modules.components.text_tokenizer import TokenizerConfig
from modules.components.var_decoder import VARConfig
from modules.components.vision_encoders import VisionEncoderConfig
from modules.components.vqvae import VQVAEConfig
from modules.vargpt11 import VARGPT11Config

# Submodule names of the composed model (modules/vargpt.py): what `load[].into` and the stages'
# trainable sets refer to.
SUBMODULES = ("vision", "und_proj", "llm", "gen_lora", "gen_in", "gen_out", "gen_cond", "gen_cond_bigram", "prompt_enc",
              "vqvae", "var")
# How the prompt reaches the VAR blocks (ModelConfig.var_cond).
VAR_CONDS = ("label", "gen_start", "prompt_attn")
LOAD_FORMATS = ("native", "official_var", "official_vqvae", "llava", "hf", "timm", "vargpt", "llava_hf", "vargpt11",
                "llama_qwen2")
# Released-behaviour switches: name -> valid values. Each left at "" (None for the numbers)
# follows `behaviour`; BEHAVIOURS gives the value of each under "corrected" (the defaults) and
# "released" (the official VARGPT-v1 code).
SWITCHES: Dict[str, tuple] = {
    "cfg_uncond": ("null_prompt", "noise"),  # unconditional half of guidance: null prompt | noise states
    "cfg_noise_rng": ("own", "sampler"),  # noise from its own generator | the sampling one, official order
    "infer_cond_row": ("cond", "null"),  # VAR condition row of the conditional half at inference
    "cond_dropout": ("prompt", "label"),  # training: drop the prompt (+ null row) | the VAR label only
    "text_labels": ("collator", "released"),  # released: input ids, only <|image_gen_pad|> masked
    "mixed_batches": ("per_sample", "released"),  # released if/elif: image loss on pad-token states
    "gen_start": ("forced", "greedy"),  # generation after a forced <|image_gen_start|> | when greedy emits it
}
BEHAVIOURS: Dict[str, Dict[str, Any]] = {
    "corrected": {"cfg_uncond": "null_prompt", "cfg_noise_rng": "own", "infer_cond_row": "cond",
                  "cond_dropout": "prompt", "text_labels": "collator", "mixed_batches": "per_sample",
                  "gen_start": "forced", "sample_cfg": 3.0, "sample_top_k": 0, "sample_top_p": 0.0},
    "released": {"cfg_uncond": "noise", "cfg_noise_rng": "sampler", "infer_cond_row": "null",
                 "cond_dropout": "label", "text_labels": "released", "mixed_batches": "released",
                 "gen_start": "greedy", "sample_cfg": 1.5, "sample_top_k": 900, "sample_top_p": 0.96},
}
# kept for callers that list the choices
CFG_UNCOND = SWITCHES["cfg_uncond"]
MIXED_BATCHES = SWITCHES["mixed_batches"]


@dataclass
class EvalConfig:
    """The `eval:` section: what validation and `experiments.evaluate` measure, and how."""

    # shard sets (patterns relative to data.root, like data sources); "" = skip that task
    vqa_shards: str = ""
    gen_shards: str = ""
    num_vqa: int = 200  # questions (first N in shard order: a fixed subset)
    num_gen: int = 64  # prompts (first N in shard order)
    max_new_tokens: int = 8
    blind_baseline: bool = True  # also ask every question without its image
    batch_size: int = 32
    # sampling protocol (written into every report)
    cfg: float = 3.0
    top_k: int = 0
    top_p: float = 0.0
    temperature: float = 1.0
    seed: int = 0  # prompt i uses seed + i
    # Draws per prompt, the one kept chosen by the model's own understanding side (the answers the
    # prompt's words imply; world prompts only; modules/self_verify.py). 1 = a single draw, the
    # protocol of every scoreboard row; N costs N draws and N x the implied questions per prompt.
    best_of: int = 1
    # Diagnostic, not a protocol: the first teacher_scales scales of each image are the prompt's
    # own target indices (VQVAE of its target image) and only the rest are sampled. Attribute
    # accuracy against it says whether the coarse layout or the fine detail is what a model
    # misses (all K scales = the VQVAE reconstruction: the tokenizer's ceiling). 0 = off.
    teacher_scales: int = 0
    # Sampling speed (VARDecoder.sample): parity false = the fast sampler in the dtype measured best
    # for the VAR's width (bf16 from width 256 where the CPU/GPU has fast bf16, else fp32);
    # parity true = the official draws in fp32. sampler: auto | official | fast;
    # sample_dtype: auto | fp32 | bf16 | fp16 | inherit.
    parity: bool = False
    sampler: str = "auto"
    sample_dtype: str = "auto"
    # feature extractor for FID / IS: "world" (reference classifier) | "inception" (torch-fidelity)
    extractor: str = "world"
    classifier_path: str = ""  # world classifier weights (safetensors); "" = no attribute/FID/IS
    inception_weights_path: str = ""
    num_real: int = 0  # real images for FID statistics; 0 = num_gen
    cache_dir: str = "runs/cache/gen_metrics"
    grid_images: int = 16  # generated images in the logged grid
    table_rows: int = 8  # (image, question, answer, prediction) rows logged
    # generation samples for the prompt-use diagnostic (teacher-forced image CE with the right
    # vs rolled prompts, see prompt_gain); 0 = skip
    prompt_gain_samples: int = 64
    # CLIP score of the generated images against their captions (torchmetrics CLIPScore: 100 x
    # cosine, floored at 0, averaged) with the CLIP model in a local directory (save_pretrained
    # layout, e.g. a copy of openai/clip-vit-large-patch14); "" = skip. Never downloaded.
    clip_dir: str = ""


@dataclass
class LoadSpec:
    """One weights file to load into (part of) the model, strictly.

    format: native          our own names (a model.safetensors from experiments.run, or a
                            component's state dict when `into` is set)
            official_var    FoundationVision/VAR var_d*.pth (into: var); class embedding ->
                            external condition embedding is allowed automatically
            official_vqvae  vae_ch160v4096z32.pth (into: vqvae)
            llava           a LLaVA-1.5 checkpoint's LLM + mm_projector keys (into: "")
            vargpt          a released VARGPT directory (VARGPT-family/VARGPT_LLaVA-v1 layout:
                            config.json + safetensors shards), the whole model, shard by shard
            llava_hf        llava-hf/llava-1.5-7b-hf (a directory): vision, und_proj and llm
            vargpt11        a released VARGPT-v1.1 directory (config.json + safetensors shards)
                            into a VARGPT11 model, whole and strict (modules/vargpt11_format.py)
            hf              a Hugging Face save_pretrained directory (into: llm or vision)
            timm            a timm ViT state dict (into: vision)
            llama_qwen2     the suite's Llama (the llm.* keys of a v1 export or world base) into
                            a v1.1 model's Qwen2 LLM (into: ""; q/k/v biases zero)
    (adapters in modules/weights.py; paths relative to the repository root)
    keys: only load these submodules from the file (e.g. [llm, vision, und_proj]); [] = all.
    """

    path: str = ""
    into: str = ""  # "" = the whole model; else one of SUBMODULES, or a dotted path (gen.vae_local)
    format: str = "native"
    keys: List[str] = field(default_factory=list)
    allow_missing: List[str] = field(default_factory=list)
    allow_unexpected: List[str] = field(default_factory=list)


@dataclass
class ModelConfig:
    # Which composed model: vargpt (v1 and this suite's extensions: modules/vargpt.py) or
    # vargpt11 (Qwen2-VL + Infinity + BSQ, modules/vargpt11.py; sizes in model.v11, the text
    # tokenizer from model.tokenizer; docs/v11.md)
    family: str = "vargpt"
    v11: Optional[VARGPT11Config] = None  # set (a mapping, even {}) with family vargpt11
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    vision: VisionEncoderConfig = field(default_factory=VisionEncoderConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    # vision features -> LLM embeddings (LLaVA-1.5: mlp2x_gelu)
    und_projector: ProjectorConfig = field(default_factory=lambda: ProjectorConfig(name="mlp", depth=2))
    # VAR front-end states -> LLM embeddings, and LLM states -> VAR block inputs
    gen_in_projector: ProjectorConfig = field(default_factory=lambda: ProjectorConfig(name="mlp", depth=2))
    gen_out_projector: ProjectorConfig = field(default_factory=lambda: ProjectorConfig(name="mlp", depth=2))
    # var_cond gen_start: LLM state at <|image_gen_start|> -> an addition to the VAR's AdaLN
    # condition; prompt_attn: LLM states of the prompt -> the VAR blocks' cross-attention context
    gen_cond_projector: ProjectorConfig = field(default_factory=lambda: ProjectorConfig(name="mlp", depth=2))
    vqvae: VQVAEConfig = field(default_factory=VQVAEConfig)
    var: VARConfig = field(default_factory=lambda: VARConfig(cond_mode="external"))
    # Not part of VARGPT: the world's reference classifier (stage 0), used by evaluation.
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    # Weights loaded after building, in order (a later file overwrites an earlier one).
    load: List[LoadSpec] = field(default_factory=list)

    # Weight dtype of und_proj, gen_in and gen_out (float32 | bfloat16 | float16); give it the
    # LLM's dtype when that is not float32 so inference runs without autocast.
    projector_dtype: str = "float32"
    # Weight dtype of the VAR decoder (bfloat16 halves its 8 GB at d30; it then computes in bf16);
    # the VQVAE always stays float32.
    var_dtype: str = "float32"
    # How the prompt reaches the VAR blocks. label (VARGPT v1): the AdaLN condition (and the SOS)
    # is one of two learned rows, conditional or unconditional, the same for every prompt: the
    # prompt arrives only through the LLM states at the <|image_gen_pad|> slots. gen_start (beyond
    # v1; a cheap form of v1.1's decoder that attends to the prompt): the AdaLN condition of the
    # blocks and the head adds gen_cond(LLM state at <|image_gen_start|>), a projector whose last
    # layer starts at zero, so training starts from v1's behaviour. prompt_attn (beyond v1, as
    # v1.1): every VAR block also cross-attends to gen_cond(LLM states of the prompt tokens, up to
    # and including <|image_gen_start|>); the cross-attention output starts at zero. Neither is
    # in the released layout.
    var_cond: str = "label"
    # var_cond prompt_attn only (beyond v1): this many small self-attention layers over the
    # projected prompt states, with positions, before the VAR cross-attends to them
    # (modules/components/prompt_encoder.py: the frozen LLM's states alone pair colours with
    # shapes poorly). Their output layers start at zero, so 0 and a fresh N compute the same.
    prompt_encoder_layers: int = 0
    # var_cond prompt_attn only (beyond v1): the cross-attention context also reads a linear map of
    # each prompt token's input embedding and the one before it (submodule gen_cond_bigram, zero at
    # init, so false and a fresh true compute the same). In "a red triangle" the key at "triangle"
    # then holds "red" exactly, where the frozen LLM's state holds it for 0.6 of the objects
    # (experiments/ablations/world_prompt_encoder.md): an image token that knows its colour can look up its shape.
    prompt_context_bigram: bool = False
    # With prompt_context_bigram: how many tokens the map reads at each position, the token and the
    # window - 1 before it (2: the bigram). In "a red circle on the left" a window of 5 puts "red"
    # and "circle" into the key at "left", so an image cell that looks up its side word finds the
    # object stated there (the side of a position is otherwise unread:
    # experiments/ablations/world_prompt_bigram.md). Changes the map's input width (window x D), so an export loads only at its own window.
    prompt_context_window: int = 2
    # Beyond v1: LoRA deltas of this rank on the LLM's linear layers that act only at the
    # <|image_gen_pad|> slots (modules/components/gen_lora.py), trained with the generation side
    # (stages 1 and 3): the image positions get their own trainable LLM while every text position
    # before an image slot, hence understanding and the prompt states, computes exactly what the
    # frozen LLM computes.
    # 0 (v1): none. B starts at zero, so a fresh rank computes what 0 does. Scale alpha / rank
    # (gen_lora_alpha 0: alpha = rank, scale 1).
    gen_lora_rank: int = 0
    gen_lora_alpha: float = 0.0
    # What the VAR blocks read at the image positions. False (VARGPT v1): gen_out(LLM states)
    # only, so every bit of the image so far reaches the VAR through the LLM. True (beyond v1): a
    # residual around the LLM, front_end(x) + gen_out(LLM states), where front_end is the VAR's
    # own input (what its pretrained blocks were trained on); gen_out's last layer starts at zero,
    # so the pretrained VAR works unchanged from the first step and the LLM adds the prompt.
    var_skip: bool = False
    # How the image loss averages its L tokens. token (VAR, VARGPT): every token alike, so the 64
    # tokens of the last scale outweigh the 14 of the first three 4.6 to 1, though those decide the
    # layout the prompt asks for; scale (beyond v1, as Infinity reweights by scale): the mean of
    # the per-scale means. Only the training objective changes; loss_img (logged) stays the token mean.
    img_loss_weighting: str = "token"
    # Teacher-forcing input noise (beyond v1; 0 = VAR / VARGPT). Training feeds the VAR the true
    # coarse scales, so it learns to copy the picture so far from them; at sampling they are its
    # own draws. With rate q > 0, each training target's input indices of scales 0..K-2 (never
    # its targets) are replaced by random codes at a per-target rate drawn from U(0, q), so the
    # prompt becomes the more reliable source (as Infinity's bitwise self-correction, without
    # re-quantizing the residual). On the world the VAR then leans on its prompt more (prompt
    # gain 1.07 against 0.78) and draws one-object prompts better (experiments/ablations/world_gen_input_noise.md).
    gen_input_noise: float = 0.0
    # Loss mix: loss = loss_text + w_img * loss_img (VARGPT v1: 1, v1.1: 3)
    w_img: float = 1.0
    # Released-behaviour switches: `behaviour` sets all of them (corrected | released, see
    # BEHAVIOURS); any one set here wins over it. Read them with `switch(name)`.
    behaviour: str = "corrected"
    cfg_uncond: str = ""  # null_prompt (trained unconditional branch) | noise (released)
    cfg_noise_rng: str = ""  # own | sampler (released: per scale the noise, then the draw)
    infer_cond_row: str = ""  # cond | null (released: the null row for both halves)
    cond_dropout: str = ""  # prompt (data.prompt_dropout) | label (released: VAR label only)
    cond_drop_rate: float = 0.1  # cond_dropout label: P(label -> null row) per target (released 0.1)
    text_labels: str = ""  # collator | released (input ids with only <|image_gen_pad|> masked)
    mixed_batches: str = ""  # per_sample | released (if/elif: no VAR inputs, image loss on pad states)
    gen_start: str = ""  # forced | greedy (released: image generation once greedy emits gen_start)
    gen_start_max_tokens: int = 64  # gen_start greedy: text tokens decoded before giving up
    # generate_image's defaults when the caller gives none (released: 1.5, 900, 0.96)
    sample_cfg: Optional[float] = None
    sample_top_k: Optional[int] = None
    sample_top_p: Optional[float] = None
    # Stage 2 also trains the understanding projector (the paper's figure) when true.
    train_und_projector: bool = False
    # Stage 3's image loss reaches the parts before the frozen LLM through it (VARGPT v1: true):
    # gen_in trains, and so does the VAR's front end at the LLM's inputs. False (beyond v1): gen_in
    # stays as stage 1 left it and the LLM's inputs are cut from the graph, so the frozen LLM runs
    # forward only and a stage-3 step skips its backward; the VAR's front end still trains through
    # var_skip and the blocks. Needs model.gen_lora_rank 0 (LoRA deltas train inside the LLM).
    stage3_through_llm: bool = True
    # The same for stage 1 (VARGPT v1: true). False: gen_in keeps its initialisation through stage
    # 1 (and stage 3 with stage3_through_llm false); the VAR still reads the LLM's states at its
    # pad slots through gen_out, the prompt through var_cond, and its own input through var_skip.
    # A stage-1 step then skips the LLM's backward (1.4x faster on the world). Needs
    # model.gen_lora_rank 0.
    stage1_through_llm: bool = True
    # Training forward: the rows of a batch are sorted by length and the LLM runs on up to this many
    # groups, each cut to its own longest row (right padding), the split chosen to cost the fewest
    # padded positions. A pure compute saving: every real position sees the same tokens, so losses
    # and gradients are the one-call ones up to float rounding. 1: one call on the whole batch. On
    # the world (stage 2: VQA rows of 113-117 tokens beside conversations and generation rows up to
    # 191) 2 groups cut the LLM's positions per row from 151 to 132 (benchmarks/length_groups.py). The 7B
    # recipes keep 1 (not measured there; under FSDP / ZeRO-3 each call gathers the sharded weights
    # again).
    llm_length_groups: int = 1

    def switch(self, name: str) -> Any:
        """The value of a released-behaviour switch: its own field if set, else the behaviour's."""
        if self.behaviour not in BEHAVIOURS:
            raise ValueError(f"model.behaviour={self.behaviour!r}; valid: {', '.join(BEHAVIOURS)}")
        own = getattr(self, name)
        return BEHAVIOURS[self.behaviour][name] if own in ("", None) else own

    def validate(self) -> None:
        for i, spec in enumerate(self.load):
            where = f"model.load[{i}]"
            # a dotted path reaches a nested part (gen.vae_local); whether a v1.1 model has it is
            # checked against the built model when it loads (modules.weights.submodule)
            if spec.into and (not all(p.isidentifier() for p in spec.into.split("."))
                              or (self.family == "vargpt" and spec.into.split(".")[0] not in SUBMODULES)):
                raise ValueError(f"{where}.into={spec.into!r}; valid: '' (whole model), {', '.join(SUBMODULES)}, "
                                 "or a dotted path under one of them (a vargpt11 model: under its own parts, "
                                 "e.g. gen.vae_local)")
            if spec.format not in LOAD_FORMATS:
                raise ValueError(f"{where}.format={spec.format!r}; valid: {', '.join(LOAD_FORMATS)}")
            bad = [k for k in spec.keys if k not in SUBMODULES]
            if bad:
                raise ValueError(f"{where}.keys has {bad}; valid: {', '.join(SUBMODULES)}")
            if not spec.path:
                raise ValueError(f"{where}.path is empty")
        if self.behaviour not in BEHAVIOURS:
            raise ValueError(f"model.behaviour={self.behaviour!r}; valid: {', '.join(BEHAVIOURS)}")
        for name, valid in SWITCHES.items():
            if getattr(self, name) not in ("",) + tuple(valid):
                raise ValueError(f"model.{name}={getattr(self, name)!r}; valid: '' (from model.behaviour), "
                                 f"{', '.join(valid)}")
        for name in ("projector_dtype", "var_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"model.{name}={getattr(self, name)!r}; valid: float32, bfloat16, float16")
        if self.img_loss_weighting not in ("token", "scale"):
            raise ValueError(f"model.img_loss_weighting={self.img_loss_weighting!r}; valid: token, scale")
        if self.var_cond not in VAR_CONDS:
            raise ValueError(f"model.var_cond={self.var_cond!r}; valid: {', '.join(VAR_CONDS)}")
        if self.prompt_encoder_layers < 0 or (self.prompt_encoder_layers and self.var_cond != "prompt_attn"):
            raise ValueError(f"model.prompt_encoder_layers={self.prompt_encoder_layers} needs model.var_cond=prompt_attn "
                             f"(it encodes the prompt the VAR cross-attends to) and a count >= 0; set it to 0 otherwise")
        if self.gen_lora_rank < 0 or self.gen_lora_alpha < 0:
            raise ValueError(f"model.gen_lora_rank={self.gen_lora_rank} / gen_lora_alpha={self.gen_lora_alpha}: both "
                             "must be >= 0 (rank 0 = no deltas, VARGPT v1; alpha 0 = the rank)")
        if self.var_cond != "label" and self.switch("cfg_uncond") == "noise":
            raise ValueError(f"model.var_cond={self.var_cond} needs the trained unconditional branch: set "
                             "model.cfg_uncond=null_prompt (noise states have no <|image_gen_start|> state)")
        if self.prompt_context_bigram and self.var_cond != "prompt_attn":
            raise ValueError(f"model.prompt_context_bigram needs model.var_cond=prompt_attn (it adds to the VAR's "
                             f"cross-attention context), got var_cond={self.var_cond!r}")
        if self.prompt_context_window != 2 and not self.prompt_context_bigram:
            raise ValueError(f"model.prompt_context_window={self.prompt_context_window} sets the width of the map that "
                             "model.prompt_context_bigram adds, which is off: set model.prompt_context_bigram=true, "
                             "or leave the window at 2")
        if self.prompt_context_window < 1:
            raise ValueError(f"model.prompt_context_window must be >= 1 (the token itself and window - 1 before it; "
                             f"2 = the bigram), got {self.prompt_context_window}")
        if self.llm_length_groups < 1:
            raise ValueError(f"model.llm_length_groups must be >= 1 (1: one LLM call per batch), got "
                             f"{self.llm_length_groups}")
        for stage in ("stage1", "stage3"):
            if not getattr(self, f"{stage}_through_llm") and self.gen_lora_rank > 0:
                raise ValueError(f"model.{stage}_through_llm=false runs the LLM forward only in {stage}, but "
                                 f"model.gen_lora_rank={self.gen_lora_rank} trains LoRA deltas inside it there: set "
                                 f"model.{stage}_through_llm=true, or model.gen_lora_rank=0")
        if not 0.0 <= self.gen_input_noise < 1.0:
            raise ValueError(f"model.gen_input_noise must be in [0, 1), got {self.gen_input_noise}")
        if not 0.0 <= self.cond_drop_rate < 1.0:
            raise ValueError(f"model.cond_drop_rate must be in [0, 1), got {self.cond_drop_rate}")
