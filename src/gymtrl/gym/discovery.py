"""Find the agents behind a NeMo Gym head server and route dataset rows to them.

Discovery: `GET {head}/global_config_dict_yaml` returns the resolved global config, JSON-encoded
YAML text. Every top-level instance with a `responses_api_agents` block is an agent; its URL is the
host/port of that block (loopback hosts rewritten to the head's host when the client is elsewhere).

Routing, NeMo Gym's own rule: a row's `agent_ref.name` names its agent. Otherwise its `task_source`
(the instance that declared the dataset, stamped by `gym dataset collate` in 0.7) routes to itself
when it is an agent, or, when it is a resources server, to the one agent that references it.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
import yaml

from gymtrl.errors import DataError, ServerError

AGENT_TYPE = "responses_api_agents"
RESOURCES_TYPE = "resources_servers"
LOOPBACK = {"127.0.0.1", "0.0.0.0", "localhost", "::1"}


# gym_launcher.py --copies names copy k of instance X "X__copy<k>".
_COPY = re.compile(r"^(?P<base>.+)__copy(?P<k>\d+)$")


@dataclass
class GymTopology:
    agents: dict[str, str]  # agent instance name -> base URL
    # resources server instance name -> agent instance names that reference it
    resources_to_agents: dict[str, list[str]] = field(default_factory=dict)
    # dataset pins: declaring instance -> pinned agent (a dataset's `agent:` key)
    pins: dict[str, str] = field(default_factory=dict)
    resources: dict[str, str] = field(default_factory=dict)  # resources server instance -> base URL
    # agent instance -> the base URLs of all its copies (the agent's own first), when it has copies
    copies: dict[str, list[str]] = field(default_factory=dict)

    def describe(self) -> str:
        """The agents, one by one, with their number of copies where they have several."""
        return ", ".join(f"{a} ({len(self.urls_of(a))} copies)" if a in self.copies else a for a in sorted(self.agents))

    def urls_of(self, agent: str) -> list[str]:
        return self.copies.get(agent) or [self.agents[agent]]

    def resources_url_of(self, agent: str) -> str | None:
        """The URL of the resources server (verifier) an agent instance uses."""
        for name, agents in self.resources_to_agents.items():
            if agent in agents and name in self.resources:
                return self.resources[name]
        return None

    def agent_for_task_source(self, source: str) -> str | None:
        if source in self.pins:
            return self.pins[source]
        if source in self.agents:
            return source
        candidates = self.resources_to_agents.get(source, [])
        return candidates[0] if len(candidates) == 1 else None

    def route(self, row: dict) -> str | None:
        """The agent instance this row goes to, or None when it routes nowhere."""
        ref = row.get("agent_ref")
        if isinstance(ref, dict) and ref.get("name"):
            name = str(ref["name"])
            return name if name in self.agents else None
        source = row.get("task_source")
        if isinstance(source, str) and source:
            return self.agent_for_task_source(source)
        return None


def route_name(row: dict) -> str:
    """What a row asked to be routed to, for error messages."""
    ref = row.get("agent_ref")
    if isinstance(ref, dict) and ref.get("name"):
        return f"agent_ref.name={ref['name']}"
    if row.get("task_source"):
        return f"task_source={row['task_source']}"
    return "(no agent_ref or task_source)"


def _implementation_block(instance: object, server_type: str) -> dict | None:
    """{server_type: {implementation_dir: block}} -> block."""
    if not isinstance(instance, dict) or not isinstance(instance.get(server_type), dict):
        return None
    blocks = [b for b in instance[server_type].values() if isinstance(b, dict)]
    return blocks[0] if blocks else None


def topology_from_config(config: dict, head_host: str | None = None, require_address: bool = True) -> GymTopology:
    """Agents, resources servers and dataset pins of a NeMo Gym config. A running Gym's config has
    every server's host and port; a config file does not (`require_address=False`: URLs are "")."""
    agents: dict[str, str] = {}
    resources_to_agents: dict[str, list[str]] = {}
    pins: dict[str, str] = {}
    resources: dict[str, str] = {}
    for name, instance in config.items():
        for server_type in (AGENT_TYPE, RESOURCES_TYPE):
            block = _implementation_block(instance, server_type)
            if block is None:
                continue
            for ds in block.get("datasets") or []:
                if isinstance(ds, dict) and ds.get("agent"):
                    agent = ds["agent"]
                    pins[name] = agent.get("name") if isinstance(agent, dict) else str(agent)
            host, port = block.get("host"), block.get("port")
            if host is None or port is None:
                if require_address:
                    continue
                url = ""
            else:
                url = f"http://{head_host if head_host and str(host) in LOOPBACK else host}:{port}"
            if server_type != AGENT_TYPE:
                resources[name] = url
                continue
            agents[name] = url
            res = block.get("resources_server")
            if isinstance(res, dict) and res.get("name"):
                resources_to_agents.setdefault(str(res["name"]), []).append(name)
    return _fold_copies(GymTopology(agents, resources_to_agents, pins, resources))


def _fold_copies(topo: GymTopology) -> GymTopology:
    """Copies of an instance are not instances of their own: an agent's copies become its URLs."""
    for name in sorted(topo.agents, key=lambda n: (len(n), n)):
        m = _COPY.match(name)
        if m and m["base"] in topo.agents:
            topo.copies.setdefault(m["base"], [topo.agents[m["base"]]]).append(topo.agents.pop(name))
    for name in list(topo.resources):
        m = _COPY.match(name)
        if m and m["base"] in topo.resources:
            del topo.resources[name]
            topo.resources_to_agents.pop(name, None)
    return topo


def fetch_global_config(head_url: str, timeout_s: float = 10.0) -> dict:
    url = f"{head_url.rstrip('/')}/global_config_dict_yaml"
    try:
        resp = httpx.get(url, timeout=timeout_s, trust_env=False)
    except httpx.HTTPError as e:
        raise ServerError(
            f"cannot reach the NeMo Gym head server at {head_url}: {type(e).__name__}",
            hint="start NeMo Gym (gym env start ...) or set gym.launch.enabled=true, and check gym.head_server_url",
        ) from None
    if resp.status_code != 200:
        raise ServerError(f"NeMo Gym head server {url} answered HTTP {resp.status_code}")
    try:
        body = resp.json()  # double-encoded: a JSON string holding YAML text
        config = yaml.safe_load(body if isinstance(body, str) else json.dumps(body))
    except (ValueError, yaml.YAMLError) as e:
        raise ServerError(f"NeMo Gym head server {url} returned an unreadable config: {e}") from None
    if not isinstance(config, dict):
        raise ServerError(f"NeMo Gym head server {url} returned a config that is not a mapping")
    return config


def wait_ready(head_url: str, timeout_s: float, is_alive=lambda: True, unreachable_after_s: float | None = None) -> None:
    """Poll `{head}/readyz` until 200 (every server and model endpoint up). With
    `unreachable_after_s`, a head server that never answered at all by then is reported at once
    (nothing is starting it) instead of after the whole timeout."""
    start = time.monotonic()
    deadline = start + timeout_s
    last = "no answer"
    answered = False
    while time.monotonic() < deadline:
        if unreachable_after_s is not None and not answered and time.monotonic() - start > unreachable_after_s:
            raise ServerError(
                f"cannot reach the NeMo Gym head server at {head_url} ({last})",
                hint="start NeMo Gym (gym env start ...) or set gym.launch.enabled=true, and check gym.head_server_url",
            )
        if not is_alive():
            raise ServerError("the NeMo Gym launcher exited before its servers were ready (see its log)")
        try:
            resp = httpx.get(f"{head_url.rstrip('/')}/readyz", timeout=5.0, trust_env=False)
            answered = True
            if resp.status_code == 200:
                return
            last = f"HTTP {resp.status_code}"
        except httpx.HTTPError as e:
            last = type(e).__name__
        time.sleep(0.5)
    raise ServerError(f"NeMo Gym head server {head_url} not ready after {timeout_s:g}s (last: {last})")


def discover(head_url: str, rewrite_loopback_hosts: bool = True) -> GymTopology:
    config = fetch_global_config(head_url)
    head_host = urlsplit(head_url).hostname if rewrite_loopback_hosts else None
    if head_host in LOOPBACK:
        head_host = None  # same machine: keep the agents' own hosts
    topo = topology_from_config(config, head_host)
    if not topo.agents:
        raise ServerError(
            f"NeMo Gym at {head_url} runs no agent servers",
            hint="its config must include at least one responses_api_agents instance",
        )
    return topo


def check_routes(rows: list, topo: GymTopology) -> None:
    """Every row (a DatasetRow: .data, .where) must route to a running agent; otherwise stop with
    the unknown names, how many rows ask for each, and where the first one is."""
    unknown: Counter = Counter()
    first: dict[str, str] = {}
    for row in rows:
        if topo.route(row.data) is None:
            name = route_name(row.data)
            unknown[name] += 1
            first.setdefault(name, row.where)
    if unknown:
        listed = "; ".join(f"{name}: {n} row(s), first at {first[name]}" for name, n in unknown.most_common())
        raise DataError(
            f"{sum(unknown.values())} row(s) route to no running agent: {listed}",
            hint=f"running agents: {', '.join(sorted(topo.agents))}; fix agent_ref/task_source or start the missing environment",
        )
