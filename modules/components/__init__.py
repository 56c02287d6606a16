"""Swappable model components: plain ``nn.Module``s, no Lightning import.

One file per family, each with a typed config dataclass, a ``Registry`` and ``build_*()``.
Importing this package registers every family, so config validation sees all names.
"""
from modules.components.registry import REGISTRIES, Registry, UnknownComponentError  # noqa: F401
from modules.components import projectors  # noqa: F401
from modules.components import text_tokenizer, vision_encoders, llm  # noqa: F401,E402
from modules.components import classifier  # noqa: F401,E402
from modules.components import vqvae, var_decoder  # noqa: F401,E402
