"""What one run builds: the DAG plan narrowed by `only` and widened by `force`.

Shared by `lmpipe run` (flows/cli.py), which decides from it whether there is anything to build before starting
Prefect, and the `lmpipe` flow (flows/pipeline.py), which submits a task per selected node. Prefect-free.
"""

from dataclasses import dataclass

from schemas.configs import PipelineConfig
from stages.corpus.files import expand_paths
from stages.dag import Node, plan, select_nodes, upstream_closure
from stages.node_builder import is_stale
from storage.artifacts import read_manifest


@dataclass(frozen=True)
class RunPlan:
    """The nodes of a config and which of them a run selects, needs and forces."""

    nodes: dict[str, Node]
    """Every node of the config, in DAG order."""
    wanted: frozenset[str]
    """The nodes the run returns: those of the `only` stages/nodes, or every node."""
    needed: frozenset[str]
    """`wanted` and everything upstream of it; upstream nodes outside `wanted` must already be built."""
    forced: frozenset[str]
    """Nodes rebuilt even when built (the `force` stages/nodes)."""

    @classmethod
    def of(cls, cfg: PipelineConfig, only: list[str] | None = None, force: list[str] | None = None) -> "RunPlan":
        """The run of `cfg` that builds the `only` stages or nodes (default: all) and rebuilds the `force` ones;
        ValueError naming the valid names for an unknown one (before anything starts)."""
        nodes = plan(cfg)
        wanted = {name for stage in only for name in select_nodes(nodes, stage)} if only else set(nodes)
        forced = {name for stage in force or [] for name in select_nodes(nodes, stage)}
        return cls(nodes, frozenset(wanted), frozenset(upstream_closure(nodes, wanted)), frozenset(forced))

    def builds(self, name: str) -> bool:
        """True when the run builds this node: it is wanted, and forced or not built yet. (A built node whose
        upstream changed is rebuilt too, but its task finds that out: see node_builder.is_stale.)"""
        return name in self.wanted and (name in self.forced or not self.nodes[name].is_built())

    def check_input_files(self) -> None:
        """MissingFileError (a ValueError naming the config field) when a path or glob that a node this run builds
        reads matches no file, or ValueError when it names a directory: before anything starts."""
        for name, node in self.nodes.items():
            files = getattr(node.config, "input_files", dict)()  # a plugin's config may be a plain BaseModel
            if files and self.builds(name):
                for field, patterns in files.items():
                    expand_paths(patterns, field)

    def finished_stamps(self) -> dict[str, str | None]:
        """Each node's finish time now (None: not built); a stamp that changes over the run means it was built."""
        return {name: node.finished_stamp() for name, node in self.nodes.items()}

    def up_to_date(self, stamps: dict[str, str | None]) -> bool:
        """True when the run has nothing to build: nothing forced, every needed node built (by `stamps`, from
        finished_stamps) and none built from upstream content that has changed since."""
        if self.forced or not all(stamps[name] for name in self.needed):
            return False
        return not any(self._stale(name) for name in self.needed)

    def _stale(self, name: str) -> bool:
        """True when a built node's recorded upstream content differs from its (built) upstream artifacts now."""
        node = self.nodes[name]
        upstream = {role: read_manifest(self.nodes[up].stage, self.nodes[up].key) for role, up in node.upstream.items()}
        return is_stale(node, upstream)
