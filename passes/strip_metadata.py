"""StripExportMetadataPass: drop the exporter's per-node debug metadata from the shipped file."""

from __future__ import annotations

import onnx_ir as ir

__all__ = ["StripExportMetadataPass", "EXPORT_METADATA_PREFIXES"]

# what torch.onnx (dynamo) writes on every node: Python stack traces, FX node text, module class
# hierarchy and name scopes (tens of kB per model, machine paths included); cora_onnx.* provenance stays
EXPORT_METADATA_PREFIXES = ("pkg.torch.onnx.", "namespace")


class StripExportMetadataPass(ir.passes.InPlacePass):
    """Remove node metadata_props whose key starts with one of `prefixes` (default: the torch
    exporter's debug entries), in the graph and its subgraphs. The provenance entries the
    cora_onnx passes write ("cora_onnx.*") are kept, so `inspect` still shows who made what."""

    def __init__(self, prefixes: tuple[str, ...] = EXPORT_METADATA_PREFIXES) -> None:
        super().__init__()
        self.prefixes = tuple(prefixes)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            drop = [k for k in node.metadata_props if k.startswith(self.prefixes)]
            for k in drop:
                del node.metadata_props[k]
            modified = modified or bool(drop)
        return ir.passes.PassResult(model, modified)
