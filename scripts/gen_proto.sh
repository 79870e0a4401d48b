#!/usr/bin/env bash
# Regenerates protocol/messages_pb2.py from protocol/messages.proto with hivemind's runtime.proto.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
HIVEMIND_PROTO=$($PY -c 'import hivemind, os; print(os.path.join(os.path.dirname(hivemind.__file__), "proto"))')
$PY -m grpc_tools.protoc -I protocol -I "$HIVEMIND_PROTO" --python_out=protocol protocol/messages.proto
# protoc writes a top-level import; hivemind's generated module lives in hivemind.proto.
sed -i 's/^import runtime_pb2 as runtime__pb2/from hivemind.proto import runtime_pb2 as runtime__pb2/' protocol/messages_pb2.py
echo "wrote protocol/messages_pb2.py"
