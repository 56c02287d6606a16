"""Special tokens shared by the data pipeline and the model (one place, no imports).

The text tokenizer must have all five added as special tokens (so they never split):
  IMAGE_TOKEN            marks an input image in the conversation text; the collator expands it
                         to `num_image_tokens` copies (the slots the vision features replace).
  IMAGE_GEN_PLACEHOLDER  marks a generation target in the *data* (VARGPT's ShareGPT form); the
                         collator replaces it by GEN_START + L x GEN_PAD + GEN_END.
  GEN_START / GEN_END    delimit the L VAR token positions of one generated image.
  GEN_PAD                one per VAR token (L = sum of pn^2 over the scales).
"""
IMAGE_TOKEN = "<image>"
IMAGE_GEN_PLACEHOLDER = "<image_gen>"
GEN_START = "<|image_gen_start|>"
GEN_END = "<|image_gen_end|>"
GEN_PAD = "<|image_gen_pad|>"

# Tokens a text tokenizer must know before the collator can run (see Collator.__init__).
SPECIAL_TOKENS = [IMAGE_TOKEN, GEN_START, GEN_END, GEN_PAD]
# Placeholders that stand for an entry of a record's `images` list, in text order.
IMAGE_PLACEHOLDERS = (IMAGE_TOKEN, IMAGE_GEN_PLACEHOLDER)

IGNORE_INDEX = -100  # label value that CrossEntropyLoss ignores
