"""The flows' policy documents in Consul KV as operators see them: read, validate, write with
check-and-set (for `meshserve config` and `meshserve status`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshserve.errors import FailedPrecondition
from meshserve.gateway.flow_policy import FLOWS, PolicyError, flow_key, validate
from meshserve.gateway.kv_documents import read_stored, shown
from meshserve.registry.client import RegistryClient


@dataclass(frozen=True)
class StoredDoc:
    flow: str
    key: str
    text: str | None  # None: no document, the built-in defaults apply
    modify_index: int  # 0 when there is no document
    error: str | None  # why the gateway refuses it (None: valid or absent)

    @property
    def version(self) -> str:
        return str(self.modify_index) if self.text is not None else "default"

    def describe(self) -> dict[str, Any]:
        return {"flow": self.flow, "key": self.key, "version": self.version, "modify_index": self.modify_index,
                "valid": self.error is None, "error": self.error, "document": shown(self.text)}  # fmt: skip


async def read_doc(client: RegistryClient, flow: str) -> StoredDoc:
    key = flow_key(flow)
    text, modify_index = await read_stored(client, key)
    if text is None:
        return StoredDoc(flow, key, None, 0, None)
    try:
        validate(flow, text)
        error = None
    except PolicyError as exc:
        error = str(exc)
    return StoredDoc(flow, key, text, modify_index, error)


async def read_all(client: RegistryClient) -> dict[str, StoredDoc]:
    return {flow: await read_doc(client, flow) for flow in FLOWS}


async def write_doc(client: RegistryClient, flow: str, text: str, cas: int | None = None) -> int:
    """Validate, then write only if the stored document is still version `cas` (None: the one
    read just now; 0: only if there is none). Returns the new ModifyIndex."""
    validate(flow, text)  # PolicyError names the field
    if cas is None:
        cas = (await read_doc(client, flow)).modify_index
    key = flow_key(flow)
    ok = await client.call(f"kv put {key}", client.consul.kv.put(key, text, cas=cas))
    if not ok:
        now = (await read_doc(client, flow)).version
        raise FailedPrecondition(f"{key} changed since version {cas or 'none'} (now {now}); "
                                 "read it again (`meshserve config get`) and retry")  # fmt: skip
    return (await read_doc(client, flow)).modify_index
