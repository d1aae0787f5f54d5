"""Settings: the guide's YAML sections, validated on load, with messages that say what to fix.

The schema is the dataclasses below; each field's metadata holds its range and a short help
text, and ``validate`` walks them. One source of truth: defaults, types, ranges, the help
shown by ``%llm config`` and the error messages all come from these declarations.

The checks are hand-written on purpose; pydantic was tried and measured. Using it for the value
checks saved 7 of 454 lines; using it for the sections too (models plus a translation of its
errors into the messages below) made 473 lines. Either way the first validation took 0.3-0.7 s
instead of about 1 ms (importing pydantic and building the schema), and its strict float accepts
numpy bools, Decimal and Fraction, which ``check_value`` refuses. The types stay plain frozen
dataclasses: params.py and bench.py check per-call values against their fields' metadata.

Where a file is found, first hit wins: an explicit path, ``$NBLLM_CONFIG``, ``./nbllm.yaml``,
then the per-user file (``~/.config/nbllm/config.yaml``, or ``$NBLLM_HOME/config.yaml``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
import reprlib
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nbllm.core import paths
from nbllm.core.errors import ConfigError, did_you_mean

DEFAULT_MODEL = "smollm2-135m"  # host/default_model.py NAME: the best chatter of benchmarks/chat_eval.py
DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"  # host/default_embedding_model.py, converted at set-up
# A config file is a few kilobytes; these bound what a hostile or mistaken one can cost.
MAX_CONFIG_BYTES = 1 << 20
# Values in the document once YAML aliases are expanded. PyYAML shares an aliased value instead of
# copying it, so a "billion laughs" file (aliases of aliases, 9 deep, 9 wide) loads in moments
# as 9**9 references to the same lists, but anything that walks it (a repr in an error message,
# a deep copy) never ends. A real config has well under a thousand values.
MAX_YAML_VALUES = 10_000
SHOWN_VALUE_CHARS = 120  # a value quoted in an error message is cut to this length


def _spec(default: Any, help: str, **limits: Any) -> Any:
    return field(default=default, metadata={"help": help, **limits})


@dataclass(frozen=True)
class Performance:
    context_size: int = _spec(4096, "tokens of context per loaded model", min=16, max=1 << 24)
    batch_size: int | None = _spec(
        None, "prompt tokens evaluated per step; null = tuned value or 512", min=1, max=1 << 16
    )
    threads: int | None = _spec(None, "CPU threads; null = tuned value or one per physical core", min=1, max=1024)
    gpu_layers: int = _spec(
        -1, "layers offloaded to the GPU; -1 = tuned value or what fits, 0 = CPU only", min=-1, max=100_000
    )
    use_mmap: bool = _spec(True, "memory-map the model file")
    use_mlock: bool = _spec(False, "lock the model in RAM (never swapped out)")
    flash_attention: bool | None = _spec(None, "flash attention; null = tuned value, else on without a GPU")
    parallel: int | None = _spec(
        None, "sequences decoded together by generate_many and the server; null = tuned value or 8", min=1, max=256
    )
    parallel_context_size: int = _spec(2048, "tokens of context (KV cache) per batched sequence", min=64, max=1 << 20)


@dataclass(frozen=True)
class Generation:
    default_temperature: float = _spec(0.7, "sampling temperature; 0 = greedy", min=0.0, max=5.0)
    default_max_tokens: int = _spec(2048, "tokens generated at most per answer", min=1, max=1 << 20)
    top_p: float = _spec(0.95, "nucleus sampling threshold", min=0.0, max=1.0)
    top_k: int = _spec(40, "sample among the k most likely tokens; 0 = all", min=0, max=1 << 20)
    min_p: float = _spec(0.05, "drop tokens below this fraction of the best one", min=0.0, max=1.0)
    repeat_penalty: float = _spec(1.1, "penalty for repeated tokens; 1 = off", min=0.0, max=10.0, exclusive_min=True)
    presence_penalty: float = _spec(0.0, "penalty for tokens already present", min=-2.0, max=2.0)
    frequency_penalty: float = _spec(0.0, "penalty growing with token frequency", min=-2.0, max=2.0)
    seed: int | None = _spec(None, "random seed; null = a new one per request, recorded in stats", min=0, max=2**32 - 1)
    speculation: str = _spec(
        "auto",
        "speculative decoding: auto = draft from the text so far where it measurably pays, off = never",
        choices=("auto", "off"),
    )
    draft_model: str | None = _spec(
        None,
        "a smaller model of the same vocabulary that drafts for speculation (a name or GGUF path); "
        "null = draft from the text so far",
    )


@dataclass(frozen=True)
class Cache:
    model_cache_size: int = _spec(2, "models kept loaded at once (least recently used evicted)", min=1, max=64)
    model_cache_bytes: int | None = _spec(
        None, "memory budget for loaded models, e.g. '8GB'; null = none", min=1, bytes=True
    )
    prompt_cache_size: int = _spec(100, "answers kept in the prompt cache", min=0, max=1_000_000)
    enabled: bool = _spec(True, "use the prompt cache")
    directory: str | None = _spec(None, "prompt cache folder; null = the user cache folder")
    prefix_cache_bytes: int = _spec(
        1 << 30, "memory for KV snapshots of evaluated prompts, per loaded model; 0 = off", min=0, bytes=True
    )


@dataclass(frozen=True)
class Server:
    host: str = _spec("127.0.0.1", "address to listen on")
    port: int = _spec(8000, "TCP port", min=1, max=65535)
    workers: int = _spec(1, "models generating at once, each on a thread (nbllm serve)", min=1, max=256)
    api_key: str | None = _spec(None, "key clients must send; required off loopback")
    request_timeout: float | None = _spec(
        600.0,
        "seconds a request may take in all (queue, prompt, answer), then 504; null = no limit",
        min=0.0,
        max=86400.0,
        exclusive_min=True,
    )


@dataclass(frozen=True)
class RemoteModel:
    """A model served elsewhere over an OpenAI-compatible API (llama-server, vLLM, Ollama, nbllm serve)."""

    url: str = _spec("", "base URL of the API, e.g. http://gpu-box:8080/v1")
    model: str | None = _spec(None, "the model's name on that server; null = the entry's own name")
    api_key: str | None = _spec(None, "sent as 'Authorization: Bearer KEY'; null = none")
    context_size: int = _spec(4096, "the remote model's context, for nbllm's checks", min=16, max=1 << 24)
    timeout: float = _spec(600.0, "seconds to wait for the server", min=1.0, max=86400.0)
    llama_extras: bool = _spec(True, "also send top_k, min_p, repeat_penalty (llama.cpp and vLLM accept them)")


@dataclass(frozen=True)
class History:
    """The log of every answer (core/history.py); NBLLM_HISTORY=0 also turns it off."""

    enabled: bool = _spec(True, "keep every answer in the history log (nbllm.history(), %llm history)")
    max_rows: int = _spec(10_000, "answers kept in the history log; the oldest go first", min=1, max=100_000_000)
    max_bytes: int | None = _spec(
        100_000_000, "size of the history log, e.g. '100MB'; the oldest answers go first; null = no limit",
        min=65_536, bytes=True,
    )  # fmt: skip
    file: str | None = _spec(None, "the history log's file; null = history.db in the data folder")


@dataclass(frozen=True)
class Logging:
    llama_cpp: str = _spec(
        "ERROR",
        "lowest level of llama.cpp's own messages passed to logging",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
    )


@dataclass(frozen=True)
class Settings:
    default_model: str = _spec(DEFAULT_MODEL, "model used when none is named")
    embedding_model: str = _spec(DEFAULT_EMBEDDING_MODEL, "model nbllm.embed / similar / ask embed with")
    models: dict[str, str] = field(default_factory=dict, metadata={"help": "extra model names: name -> .gguf path"})
    remote_models: dict[str, RemoteModel] = field(
        default_factory=dict, metadata={"help": "models on OpenAI-compatible servers: name -> url, model, api_key"}
    )
    performance: Performance = field(default_factory=Performance)
    generation: Generation = field(default_factory=Generation)
    cache: Cache = field(default_factory=Cache)
    server: Server = field(default_factory=Server)
    history: History = field(default_factory=History)
    logging: Logging = field(default_factory=Logging)
    source: str = field(default="defaults", compare=False)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("source")
        return data

    def merged(self, overrides: Mapping[str, Any], source: str = "overrides") -> Settings:
        """A copy with ``overrides`` (same shape as the YAML) validated and applied."""
        base = self.to_dict()
        for key, value in overrides.items():
            if isinstance(value, Mapping) and isinstance(base.get(key), dict):
                base[key] = {**base[key], **value}
            else:
                base[key] = value
        return validate(base, source=source)


SECTIONS: dict[str, type] = {
    "performance": Performance,
    "generation": Generation,
    "cache": Cache,
    "server": Server,
    "history": History,
    "logging": Logging,
}
TOP_LEVEL_KEYS = ("default_model", "embedding_model", "models", "remote_models", *SECTIONS)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def parse_bytes(value: Any) -> int | None:
    """``8GB`` -> 8e9, ``512MiB`` -> 512 * 2**20, an int stays an int; None if unreadable."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str):
        return None
    match = _SIZE.match(value)
    if not match:
        return None
    number, unit = float(match.group(1)), match.group(2).upper()
    binary = "I" in unit
    letter = unit[:1] if unit[:1] in "KMGT" else ""
    scale = 1024 ** "BKMGT".index(letter or "B") if binary else _UNITS[letter]
    return int(number * scale)


class _BoundedRepr(reprlib.Repr):
    """``repr`` that looks at a bounded part of a value: a few items per container, a few levels
    deep, the ends of a long string or number. An error message must stay short and quick to
    build whatever was written: a shared or self-containing structure, a megabyte string, an
    integer too long for ``repr`` (Python refuses to print more than 4,300 digits)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxdict = self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = self.maxdeque = 4
        self.maxstring = self.maxother = SHOWN_VALUE_CHARS
        self.maxlong = 40

    def repr1(self, x: Any, level: int) -> str:
        # By kind, where reprlib goes by exact type name: a subclass of dict or str (or another
        # Mapping) gets the same bounds instead of its full repr.
        if isinstance(x, bool) or x is None:
            return repr(x)
        if isinstance(x, str):
            return self.repr_str(x, level)
        if isinstance(x, int):
            return self.repr_int(x, level)
        if isinstance(x, (bytes, bytearray)):  # YAML's !!binary
            return self.repr_instance(bytes(x[: self.maxother]), level)
        if isinstance(x, Mapping):
            pairs = (f"{self.repr1(k, level - 1)}: {self.repr1(v, level - 1)}" for k, v in x.items())
            return self._items("{", pairs, len(x), level, "}") if x else "{}"
        if isinstance(x, (list, tuple, set, frozenset)):  # sets: YAML's !!set
            if isinstance(x, (set, frozenset)) and not x:
                return repr(x)
            left, right = ("[", "]") if isinstance(x, list) else ("(", ",)" if len(x) == 1 else ")")
            if isinstance(x, (set, frozenset)):
                left, right = "{", "}"
            return self._items(left, (self.repr1(item, level - 1) for item in x), len(x), level, right)
        return self.repr_instance(x, level)

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 4000:  # beyond sys.get_int_max_str_digits(): repr would raise
            return f"<an integer of about {int(x.bit_length() * math.log10(2)) + 1:,} digits>"
        return super().repr_int(x, level)

    def _items(self, left: str, pieces: Iterator[str], count: int, level: int, right: str) -> str:
        # Unlike reprlib, keys and set items are not sorted first (a cost that grows with the
        # container): they come as written, which reads better in a message anyway.
        if count and level <= 0:
            return f"{left}...{right}"
        first = list(itertools.islice(pieces, self.maxlist))
        return left + ", ".join(first + (["..."] if count > len(first) else [])) + right


_BOUNDED_REPR = _BoundedRepr()


def shown(value: Any) -> str:
    """``repr(value)`` for a message, at most about ``SHOWN_VALUE_CHARS`` characters however large
    or deeply shared the value is."""
    try:
        text = _BOUNDED_REPR.repr(value)
    except Exception:  # a hostile __repr__ (Python callers can pass anything)
        text = f"<a {type(value).__name__}>"
    if len(text) > SHOWN_VALUE_CHARS:
        half = SHOWN_VALUE_CHARS // 2 - 2
        text = f"{text[:half]}...{text[-half:]}"
    return text


def _key_name(key: Any) -> str:
    """A mapping key as written in a dotted name (``performance.threads``), cut short if huge."""
    return key if isinstance(key, str) and len(key) <= SHOWN_VALUE_CHARS else shown(key)


def _describe(name: str, hint: Any, meta: Mapping[str, Any]) -> str:
    nullable = type(None) in typing.get_args(hint)
    base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
    if "choices" in meta:
        allowed = "one of " + ", ".join(map(str, meta["choices"]))
    elif meta.get("bytes"):
        allowed = "a size such as 512MB or 8GB"
    elif base is bool:
        allowed = "true or false"
    elif base in (int, float):
        kind = "an integer" if base is int else "a number"
        low, high = meta.get("min"), meta.get("max")
        if low is not None and high is not None:
            allowed = f"{kind} from {low} to {high}"
            if meta.get("exclusive_min"):
                allowed = f"{kind} above {low} and at most {high}"
        elif low is not None:
            allowed = f"{kind} of at least {low}"
        else:
            allowed = kind
    else:
        allowed = "a string"
    if nullable:
        allowed += ", or null"
    return allowed


def check_value(
    label: str,
    value: Any,
    hint: Any,
    meta: Mapping[str, Any],
    where: str = "",
    error: type[Exception] = ConfigError,
) -> Any:
    """``value`` converted to the declared type, or ``error`` naming label, value and what is allowed."""

    def fail() -> Exception:
        described = _describe(label, hint, meta)
        help_text = meta.get("help", "")
        told = f" ({help_text})." if help_text else "."
        return error(f"{label} = {shown(value)}{where}: must be {described}{told}")

    args = typing.get_args(hint)
    nullable = type(None) in args
    base = next((t for t in args if t is not type(None)), hint)
    if value is None:
        if nullable:
            return None
        raise fail()
    if meta.get("bytes"):
        parsed = parse_bytes(value)
        if parsed is None or parsed < meta.get("min", 0):
            raise fail()
        return parsed
    if base is bool:
        if not isinstance(value, bool):
            raise fail()
        return value
    # bool is a subclass of int in Python, but `threads: true` is a mistake, not 1.
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if (base is int and not (is_number and isinstance(value, int))) or (base is float and not is_number):
        raise fail()
    if base is str and not isinstance(value, str):
        raise fail()
    if base is float:
        try:
            value = float(value)
        except OverflowError:  # an int beyond any float, such as 10**400
            raise fail() from None
        if not math.isfinite(value):  # NaN passes every range comparison below
            raise fail()
    if "choices" in meta and value not in meta["choices"]:
        raise fail()
    low, high = meta.get("min"), meta.get("max")
    if low is not None and (value <= low if meta.get("exclusive_min") else value < low):
        raise fail()
    if high is not None and value > high:
        raise fail()
    return value


def _validate_section(name: str, cls: type, data: Any, source: str) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"Section {name!r} in {source} must be a mapping of keys to values, not {type(data).__name__}."
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            hint = did_you_mean(key, fields) if isinstance(key, str) and len(key) <= SHOWN_VALUE_CHARS else ""
            raise ConfigError(
                f"Unknown key {name}.{_key_name(key)} in {source}.{hint} Keys allowed in {name}: {', '.join(fields)}."
            )
        values[key] = check_value(f"{name}.{key}", value, hints[key], fields[key].metadata, f" in {source}")
    return cls(**values)


def _validate_models(data: Any, source: str) -> dict[str, str]:
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"models in {source} must map model names to .gguf paths, e.g. 'mymodel: ~/models/my.gguf'.")
    models: dict[str, str] = {}
    for name, value in data.items():
        if isinstance(value, Mapping) and set(value) == {"path"}:
            value = value["path"]
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"models in {source}: model name {shown(name)} must be a non-empty string.")
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(
                f"models.{_key_name(name)} = {shown(value)} in {source}: must be the path of a .gguf file "
                "(or a mapping with the single key 'path')."
            )
        models[name] = value
    return models


def _validate_remote_models(data: Any, source: str) -> dict[str, RemoteModel]:
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"remote_models in {source} must map names to settings, e.g. 'big: {{url: http://gpu-box:8080/v1}}'."
        )
    remotes: dict[str, RemoteModel] = {}
    for name, value in data.items():
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"remote_models in {source}: model name {shown(name)} must be a non-empty string.")
        if isinstance(value, RemoteModel):
            remotes[name] = value
            continue
        remote = _validate_section(f"remote_models.{_key_name(name)}", RemoteModel, value, source)
        if not remote.url.startswith(("http://", "https://")):
            raise ConfigError(
                f"remote_models.{_key_name(name)}.url = {shown(remote.url)} in {source}: must be an http(s) URL "
                "such as http://localhost:8080/v1."
            )
        remotes[name] = remote
    return remotes


def validate(data: Any, source: str = "overrides") -> Settings:
    """Turn parsed YAML (or a dict of overrides) into ``Settings``; ``ConfigError`` if invalid."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source} must hold a mapping of sections ({', '.join(TOP_LEVEL_KEYS)}), not {type(data).__name__}."
        )
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            hint = did_you_mean(key, TOP_LEVEL_KEYS) if isinstance(key, str) and len(key) <= SHOWN_VALUE_CHARS else ""
            raise ConfigError(
                f"Unknown config section {shown(key)} in {source}.{hint} Sections: {', '.join(TOP_LEVEL_KEYS)}."
            )
    default_model = data.get("default_model", DEFAULT_MODEL)
    if not isinstance(default_model, str) or not default_model.strip():
        raise ConfigError(f"default_model = {shown(default_model)} in {source}: must be a model name or a .gguf path.")
    embedding_model = data.get("embedding_model", DEFAULT_EMBEDDING_MODEL)
    if not isinstance(embedding_model, str) or not embedding_model.strip():
        raise ConfigError(
            f"embedding_model = {shown(embedding_model)} in {source}: must be a model name or a .gguf path."
        )
    sections = {name: _validate_section(name, cls, data.get(name), source) for name, cls in SECTIONS.items()}
    return Settings(
        default_model=default_model,
        embedding_model=embedding_model,
        models=_validate_models(data.get("models"), source),
        remote_models=_validate_remote_models(data.get("remote_models"), source),
        source=source,
        **sections,
    )


def find_config_file(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The config file that applies, by the documented order; None means built-in defaults."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"Config file {path} {_not_a_file(path)}. Check the path, or leave it out to use defaults."
            )
        return path
    from_env = os.environ.get("NBLLM_CONFIG")
    if from_env:
        path = Path(from_env).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"NBLLM_CONFIG points to {path}, which {_not_a_file(path)}. Fix the variable or unset it."
            )
        return path
    for candidate in (Path.cwd() / "nbllm.yaml", paths.user_config_file()):
        if candidate.is_file():
            return candidate
    return None


def _not_a_file(path: Path) -> str:
    return "is a folder, not a YAML file" if path.is_dir() else "does not exist"


def load_settings(explicit: str | os.PathLike[str] | None = None) -> Settings:
    """Settings from the config file that applies (see ``find_config_file``), validated."""
    path = find_config_file(explicit)
    if path is None:
        return Settings()
    return load_file(path)


def _config_loader() -> Any:
    """PyYAML's safe loader, stricter in two ways that a config file never needs:

    - a key given twice in one mapping is an error: YAML would silently keep the last one, and
      the first is then a setting that seems to apply;
    - aliases are bounded: a document whose values, with every alias expanded, number more than
      ``MAX_YAML_VALUES``, or an alias inside the value it names, is refused before anything is
      built. Aliases stay usable (``<<: *defaults`` merges in ``remote_models``).
    """
    import yaml

    def refusal(problem: str, advice: str, mark: Any) -> yaml.constructor.ConstructorError:
        error = yaml.constructor.ConstructorError(None, None, problem, mark)
        error.advice = advice  # type: ignore[attr-defined]  # read by _parse_yaml
        return error

    def check_expansion(root: yaml.Node) -> None:
        # Counted over the node graph the composer built, each node once (its expanded size is
        # remembered): linear in the file, however many times an alias multiplies it.
        sizes: dict[int, int] = {}
        open_nodes: set[int] = set()

        def expanded(node: yaml.Node) -> int:
            if isinstance(node, yaml.ScalarNode):
                return 1
            if id(node) in sizes:
                return sizes[id(node)]
            if id(node) in open_nodes:
                raise refusal(
                    "an alias refers to the value that contains it",
                    "Write the value out instead of making it contain itself.",
                    node.start_mark,
                )
            open_nodes.add(id(node))
            children = node.value if isinstance(node, yaml.SequenceNode) else [n for pair in node.value for n in pair]
            total = 1 + sum(expanded(child) for child in children)
            open_nodes.discard(id(node))
            if total > MAX_YAML_VALUES:
                raise refusal(
                    f"with its aliases expanded, this value holds more than {MAX_YAML_VALUES:,} values",
                    "A config file needs no nested aliases of aliases: write the values out.",
                    node.start_mark,
                )
            sizes[id(node)] = total
            return total

        expanded(root)

    class ConfigLoader(yaml.SafeLoader):
        def construct_document(self, node: yaml.Node) -> Any:
            check_expansion(node)
            return super().construct_document(node)

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            # The mapping's own plain keys, compared as written (before "<<" merges, whose keys
            # the mapping may override on purpose; and without constructing unhashable keys).
            seen: dict[tuple[str, str], Any] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise refusal(
                        f"{shown(key_node.value)} is given twice (also at line {seen[key].line + 1})",
                        "Keep one of them.",
                        key_node.start_mark,
                    )
                seen[key] = key_node.start_mark
            return super().construct_mapping(node, deep=deep)

    return ConfigLoader


def _parse_yaml(text: str, what: str) -> Any:
    """``text`` as YAML (``_config_loader``), or a ``ConfigError`` about ``what`` that says where
    and what to do. Every failure of the parser is one: a syntax error, a refused alias, a
    constructor's own check (a date such as 2024-13-45, a number of 5,000 digits), deep nesting."""
    import yaml  # deferred: keeps ``import nbllm`` fast for the common no-config case

    try:
        return yaml.load(text, Loader=_config_loader())  # a SafeLoader subclass
    except yaml.YAMLError as error:
        where = ""
        mark = getattr(error, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = _cut(getattr(error, "problem", None) or str(error))
        advice = getattr(error, "advice", None) or "Fix the YAML syntax (indent with spaces, 'key: value' pairs)."
        raise ConfigError(f"Cannot parse {what}{where}: {problem}. {advice}") from error
    except RecursionError:
        raise ConfigError(
            f"Cannot parse {what}: its values are nested too deeply. A config is a few levels of 'key: value'."
        ) from None
    except ValueError as error:
        raise ConfigError(f"Cannot parse {what}: {_cut(str(error))}. Fix that value.") from None


def _cut(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def load_file(path: Path) -> Settings:
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise ConfigError(f"Cannot read config file {path}: {error}.") from error
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"Config file {path} is over {MAX_CONFIG_BYTES:,} bytes; a config file is a few kilobytes. "
            "Check that it is the right file."
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"Cannot read config file {path}: {error}.") from error
    return validate(_parse_yaml(text, f"config file {path}"), source=str(path))


def describe_settings(settings: Settings) -> list[tuple[str, Any, str]]:
    """(dotted key, value, help) for every setting, for display."""
    rows: list[tuple[str, Any, str]] = [
        ("default_model", settings.default_model, "model used when none is named"),
        ("embedding_model", settings.embedding_model, "model nbllm.embed / similar / ask embed with"),
    ]
    for name in SECTIONS:
        section = getattr(settings, name)
        for f in dataclasses.fields(section):
            rows.append((f"{name}.{f.name}", getattr(section, f.name), f.metadata.get("help", "")))
    for model, path in settings.models.items():
        rows.append((f"models.{model}", path, "model file"))
    for model, remote in settings.remote_models.items():
        key = "set (hidden)" if remote.api_key else "none"
        rows.append((f"remote_models.{model}", f"{remote.url} model={remote.model or model} api_key={key}", "remote"))
    return rows


def parse_assignment(text: str) -> dict[str, Any]:
    """``"cache.model_cache_size=3"`` -> ``{"cache": {"model_cache_size": 3}}`` (value read as YAML)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"Expected KEY=VALUE such as cache.model_cache_size=3, got {shown(text)}.")
    value = _parse_yaml(raw.strip(), f"the value in {shown(text)}") if raw.strip() else None
    section, dot, name = key.partition(".")
    if not dot:
        return {section: value}
    return {section: {name: value}}
