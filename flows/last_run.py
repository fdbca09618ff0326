"""The last `lmpipe run`'s config, remembered under the artifact root, so that `status`, `sql`, `report`,
`generate`, ... given no --preset/--config/--set look at what was last built (not the default preset's views).

File: <root>/_last_run.json = {"preset", "config", "overrides", "resolved"}: how the run was asked for, and the
resolved PipelineConfig as JSON (used as is, so an edited or deleted config file does not change it).
"""

import json
import logging
from pathlib import Path

from schemas.configs import PipelineConfig
from schemas.loading import ConfigError, load_config, validate
from storage.artifacts import artifact_root
from storage.atomic import write_text_atomic

log = logging.getLogger(__name__)

LAST_RUN_FILE = "_last_run.json"
DEFAULT_PRESET = "default"


def last_run_path(root: Path | None = None) -> Path:
    """Where the last run's config is kept."""
    return (root or artifact_root()) / LAST_RUN_FILE


def remember(args, cfg: PipelineConfig) -> None:
    """Record the config of a run that is about to build (written atomically)."""
    record = {"preset": args.preset or DEFAULT_PRESET,
              "config": str(Path(args.config).resolve()) if args.config else None,
              "overrides": list(args.overrides), "resolved": cfg.model_dump(mode="json")}
    path = last_run_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=1))


def describe(record: dict) -> str:
    """`--preset tiny --config x.toml --set a=b` of a record."""
    parts = [f"--preset {record['preset']}"] + ([f"--config {record['config']}"] if record.get("config") else [])
    return " ".join(parts + [f"--set {override}" for override in record.get("overrides", [])])


def config_from_args(args) -> PipelineConfig:
    """The config of --preset/--config/--set; with none of them, the last run's (else the default preset)."""
    if args.preset is not None or args.config or args.overrides:
        return load_config(args.preset or DEFAULT_PRESET, args.config, args.overrides)
    path = last_run_path()
    if not path.is_file():
        return load_config(DEFAULT_PRESET)
    try:
        record = json.loads(path.read_text())
        cfg = validate(record["resolved"])
    except (json.JSONDecodeError, KeyError, TypeError, ConfigError) as err:
        log.warning("ignoring %s (%s); using the default preset", path, str(err).splitlines()[0])
        return load_config(DEFAULT_PRESET)
    log.info("config of the last run (%s); give --preset/--config/--set to choose another", describe(record))
    return cfg
