"""Stage 0 of the embedded world: train the tiny stand-ins for the pretrained parts, one file per base.

    base_vqvae       vqvae.py       multi-scale VQVAE on world images          self.net = MultiScaleVQVAE
    base_var         var.py         class-conditional VAR on VQ indices of the  self.net = VARDecoder
                                    world's `class` task (24 (shape, colour) classes)
                                    and, with data.scene_labels scene, its generation
                                    scenes (null class for 2-3 objects)
    base_classifier  classifier.py  reference classifier (FID/IS features,      self.net = WorldCNN
                                    attribute read-back)
    base_vision      vision.py      tiny_vit tower + per-slot attribute heads   self.net = VisionEncoder
                                    (only the tower is exported)
    base_llm         llm.py         tiny Llama as a language model on world     self.net = LlamaForCausalLM
                                    text (trains + saves the world tokenizer first if missing)
    (data.py: the world's shards read once into RAM, random batches from there)

``self.net`` is exactly the component, so the export (``model.safetensors``) loads into that
component with a strict load, e.g.
``model.load: [{path: runs/bases/vqvae/model.safetensors, into: vqvae}]``.
Nothing is imported here: modules.stages imports a base's file when that stage is built.
"""
