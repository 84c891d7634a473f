"""rewardkit-hpsv3: HPSv3 (MizzenAI, ICCV 2025) as a rewardkit reward, on transformers 5's Qwen2-VL classes.

The `hpsv3` package itself pins transformers 4.45.2 and pulls deepspeed, trl, opencv, datasets, omegaconf and fire;
this plugin loads its published checkpoint (MizzenAI/HPSv3, HPSv3.safetensors) into transformers' Qwen2VLModel plus
HPSv3's reward head through a weight-name mapping (rewardkit_hpsv3.model) and scores as HPSv3 does: mu of the
head's (mu, log sigma) at the <|Reward|> token of HPSv3's prompt.
"""

from __future__ import annotations

import json
import threading
import weakref
from pathlib import Path
from typing import Sequence

import torch

import rewardkit
from rewardkit.errors import UserError
from rewardkit.rewards import ModelDType, Reward, RewardOptions, load_dtype

__version__ = "0.1.0"

_MODELS: weakref.WeakValueDictionary[tuple, torch.nn.Module] = weakref.WeakValueDictionary()  # alive while a reward holds it
_PROCESSORS: dict[str, "HPSv3Processor"] = {}
_LOCK = threading.Lock()

PROCESSOR_FILES = ("config.json", "preprocessor_config.json", "tokenizer_config.json", "tokenizer.json")
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
WHAT_WEIGHTS = "HPSv3 weights"
WHAT_PROCESSOR = "HPSv3's processor files (Qwen2-VL-7B-Instruct's tokenizer, chat template, image settings and config)"


class HPSv3Options(RewardOptions):
    weights: str = "MizzenAI/HPSv3/HPSv3.safetensors"
    """HPSv3 checkpoint (safetensors): a hub reference 'owner/repo/file' or a local path."""
    processor: str = "Qwen/Qwen2-VL-7B-Instruct"
    """Qwen2-VL's processor and architecture: a hub repo id, or a local folder holding its config.json,
    preprocessor_config.json, tokenizer.json, tokenizer_config.json and chat template (chat_template.json or
    chat_template.jinja, or one inside tokenizer_config.json)."""
    dtype: ModelDType = "auto"
    """Precision of the Qwen2-VL towers: 'auto' is the run's (run.mixed_precision); the reward head stays float32;
    scores are float32."""
    gradient_checkpointing: bool = False
    """Recompute vision blocks and decoder layers during backward: less memory, more time."""


class HPSv3(Reward):
    """HPSv3: a Qwen2-VL-7B human preference model; the score is the mean (mu) of its uncertainty-aware head."""

    name = "hpsv3"
    Options = HPSv3Options
    input_size = (448, 448)  # HPSv3's 256 * 28 * 28 pixel budget at a square aspect ratio

    def __init__(self, **options):
        super().__init__(**options)
        self.processor = load_processor(self.options.processor)
        self.build(load_dtype(self.options.dtype))

    def build(self, dtype: torch.dtype) -> None:
        self.net = load_model(self.options.weights, self.processor, dtype)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.mu_and_log_sigma(images, prompts)[:, 0]

    def mu_and_log_sigma(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """HPSv3's raw head output (B, 2): mu (the score) and log sigma (its uncertainty: sigma = exp)."""
        from rewardkit_hpsv3.model import preprocess

        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images and {len(prompts)} prompts")
        p = self.processor
        pixel_values, grid = preprocess(images.float(), p.image_mean, p.image_std, p.patch_size, p.merge_size, p.temporal_patch_size)
        image_tokens = int(grid[0].prod()) // p.merge_size**2
        input_ids, attention_mask, reward_index = p.encode(prompts, image_tokens)
        device = images.device
        self.net.checkpointing = self.options.gradient_checkpointing  # per call: the model may be shared
        return self.net(pixel_values, grid, input_ids.to(device), attention_mask.to(device), reward_index.to(device))


class HPSv3Processor:
    """HPSv3's text side and Qwen2-VL's image settings, read from a processor folder.

    `encode` renders HPSv3's chat for each prompt with the folder's chat template, expands the single
    <|image_pad|> to the image's token count (as Qwen2VLProcessor does), pads on the right (as HPSv3's
    processor, padding_side='right') and finds the <|Reward|> position."""

    def __init__(self, folder: Path, config_path: Path):
        from transformers import AutoTokenizer

        from rewardkit_hpsv3.model import REWARD_TOKEN

        self.folder = folder
        self.config_path = config_path
        self.config = json.loads(config_path.read_text(encoding="utf-8"))
        image = json.loads((folder / "preprocessor_config.json").read_text(encoding="utf-8"))
        self.image_mean = tuple(image.get("image_mean", (0.48145466, 0.4578275, 0.40821073)))
        self.image_std = tuple(image.get("image_std", (0.26862954, 0.26130258, 0.27577711)))
        self.patch_size = int(image.get("patch_size", 14))
        self.merge_size = int(image.get("merge_size", 2))
        self.temporal_patch_size = int(image.get("temporal_patch_size", 2))
        vision = self.config.get("vision_config", {})
        expected = {"patch_size": self.patch_size, "spatial_merge_size": self.merge_size, "temporal_patch_size": self.temporal_patch_size}
        for key, value in expected.items():
            if key in vision and int(vision[key]) != value:
                raise UserError(f"{WHAT_PROCESSOR}: {folder}: preprocessor_config.json and config.json disagree on {key} ({value} vs {vision[key]})")
        if self.patch_size * self.merge_size != 28:
            raise UserError(f"{WHAT_PROCESSOR}: {folder}: HPSv3's pixel budget needs patch_size * merge_size = 28, got {self.patch_size} * {self.merge_size}")

        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})  # HPSv3 adds it; no-op if present
        self.reward_token_id = self.tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        if self.config.get("image_token_id", self.image_token_id) != self.image_token_id:
            raise UserError(f"{WHAT_PROCESSOR}: {folder}: config.json's image_token_id is not the tokenizer's <|image_pad|>")
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.chat_template = _chat_template(folder, self.tokenizer)
        self._ids: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self.tokenizer)

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of HPSv3's chat for `prompt`, with a single <|image_pad|> (cached: prompts repeat in training)."""
        ids = self._ids.get(prompt)
        if ids is None:
            from rewardkit_hpsv3.model import hpsv3_messages

            text = self.tokenizer.apply_chat_template(
                hpsv3_messages(prompt), chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
            )
            ids = list(self.tokenizer(text).input_ids)
            if ids.count(self.image_token_id) != 1 or self.reward_token_id not in ids:
                raise UserError(f"HPSv3: the prompt {prompt[:60]!r} must not contain Qwen2-VL's image or HPSv3's reward token")
            if len(self._ids) < 4096:
                self._ids[prompt] = ids
        return ids

    def encode(self, prompts: Sequence[str], image_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, reward_index) for one image of `image_tokens` merged tokens per prompt."""
        rows = []
        for prompt in prompts:
            ids = self.prompt_ids(prompt)
            at = ids.index(self.image_token_id)
            rows.append(ids[:at] + [self.image_token_id] * image_tokens + ids[at + 1 :])
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        reward_index = torch.empty(len(rows), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r)
            attention_mask[i, : len(r)] = 1
            reward_index[i] = len(r) - 1 - r[::-1].index(self.reward_token_id)  # the query's (last) <|Reward|>
        return input_ids, attention_mask, reward_index


def _chat_template(folder: Path, tokenizer) -> str:
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (folder / "chat_template.json").is_file():
        return json.loads((folder / "chat_template.json").read_text(encoding="utf-8"))["chat_template"]
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        return tokenizer.chat_template
    raise UserError(f"{WHAT_PROCESSOR}: {folder} holds no chat template (chat_template.json, chat_template.jinja or tokenizer_config.json)")


def _processor_folder(ref: str) -> tuple[Path, Path]:
    """(folder holding the tokenizer and preprocessor files, path of config.json) for a local folder or a hub repo id."""
    from rewardkit import hub

    path = Path(ref).expanduser()
    if path.is_dir():
        missing = [name for name in PROCESSOR_FILES if not (path / name).is_file()]
        if missing:
            raise UserError(f"{WHAT_PROCESSOR}: folder {path} lacks {', '.join(missing)}; set the reward's `processor` option to a folder holding {', '.join(PROCESSOR_FILES)} and the chat template")
        return path, path / "config.json"
    if hub.looks_local(ref) or len(ref.strip("/").split("/")) != 2:
        raise UserError(f"{WHAT_PROCESSOR}: no such folder {path}; set the reward's `processor` option to a hub repo id 'owner/repo' or a local folder")
    repo = ref.strip("/")
    resolved = {}
    for name in PROCESSOR_FILES:
        try:
            resolved[name] = hub.resolve(f"{repo}/{name}", what=WHAT_PROCESSOR, option="processor")
        except UserError as exc:
            raise UserError(
                f"{exc} The `processor` folder holds {', '.join(PROCESSOR_FILES)} and chat_template.json "
                f"(`hf download {repo} {' '.join(PROCESSOR_FILES)} chat_template.json`)."
            ) from None
    for name in TEMPLATE_FILES:  # optional: the template may live in tokenizer_config.json
        try:
            hub.resolve(f"{repo}/{name}", what=WHAT_PROCESSOR, option="processor")
        except UserError:
            pass
    return resolved["tokenizer.json"].parent, resolved["config.json"]


def load_processor(ref: str) -> HPSv3Processor:
    with _LOCK:
        if ref not in _PROCESSORS:
            folder, config_path = _processor_folder(ref)
            _PROCESSORS[ref] = HPSv3Processor(folder, config_path)
        return _PROCESSORS[ref]


def load_model(weights: str, processor: HPSv3Processor, dtype: torch.dtype = torch.float32):
    """The HPSv3 model with weights from `weights` (hub reference or local .safetensors path) and the architecture of
    `processor`'s config.json, its Qwen2-VL towers in `dtype` and its head in float32; built once per process, file and
    dtype while some reward holds it (never cast in place)."""
    from accelerate import init_empty_weights

    from rewardkit import hub
    from rewardkit_hpsv3.model import (
        HPSv3Model,
        architecture_config,
        convert_state_dict,
        load_checkpoint,
        rope_frequencies_as_hpsv3,
        set_buffers,
    )

    path = hub.resolve(weights, what=WHAT_WEIGHTS, option="weights")
    if path.suffix != ".safetensors":
        raise UserError(f"{WHAT_WEIGHTS}: {path} is not a .safetensors file (HPSv3 is published as HPSv3.safetensors; only safetensors is loaded)")
    key = (str(path), str(processor.config_path), dtype)
    with _LOCK:
        model = _MODELS.get(key)
        if model is None:
            state = hub.load_state_dict(path, what=WHAT_WEIGHTS)
            try:
                converted = convert_state_dict(state)
                rows = converted["model.language_model.embed_tokens.weight"].shape[0]
            except KeyError as exc:
                raise UserError(f"{WHAT_WEIGHTS}: {path} is not in HPSv3's layout (unknown or missing tensor {exc})") from None
            if rows != len(processor):
                raise UserError(
                    f"{WHAT_WEIGHTS}: {path} has {rows} token embeddings but the processor's tokenizer with <|Reward|> has "
                    f"{len(processor)} tokens: `processor` must be the tokenizer HPSv3 was trained with (Qwen/Qwen2-VL-7B-Instruct)"
                )
            config = architecture_config(processor.config, rows)
            with torch.device("cpu"), init_empty_weights(include_buffers=False):  # no 8B random init; buffers are real
                model = HPSv3Model(config)
            load_checkpoint(model, converted, what=f"{WHAT_WEIGHTS} ({path}, architecture of {processor.config_path})")
            rope = rope_frequencies_as_hpsv3(model)
            model = model.to(dtype)
            model.rm_head.float()
            set_buffers(model, rope)
            model = _MODELS[key] = model.eval().requires_grad_(False)
        return model


@rewardkit.hookimpl
def register_rewards(register):
    register(HPSv3)
