"""The RPC contract another implementation must match: handler names, error codes, framing.

Every RPC is one libp2p stream (hivemind's binary stream handlers) carrying frames: a 4-byte
big-endian length, then one protobuf of ``protocol/messages.proto``. The caller sends its
request frames and an end marker, the server answers with response frames and an end marker.
Tensors larger than one frame travel as several parts (hivemind's ``split_for_streaming``).
"""

from __future__ import annotations

from enum import Enum

# Handler names, one per RPC.
FORWARD = "swarmtrain.forward"  # StageRequest -> StageResponse (outputs, or loss + grad_inputs on the last stage)
BACKWARD = "swarmtrain.backward"  # StageRequest -> StageResponse (grad_inputs)
INFO = "swarmtrain.info"  # InfoRequest -> InfoResponse
STATE = "swarmtrain.state"  # StateRequest -> StateResponse: the stage's parameters, for the keeper
CKPT = "swarmtrain.ckpt"  # CkptRequest -> CkptResponse: list or read a checkpoint's files
TEACH = "swarmtrain.teach"  # TeachRequest -> TeachResponse: a teacher's soft targets for one micro-batch
OUTER = "swarmtrain.outer"  # OuterRequest -> OuterResponse: one contribution of an outer round
REACH = "swarmtrain.reach"  # ReachRequest -> ReachResponse: dial me back / relay for me (relays serve it)
RELAY = "swarmtrain.relay"  # Route, then any RPC's frames: a relay passes them on to a peer it relays for
RELAYED = "swarmtrain.relayed"  # Route, then the RPC's frames: what a relayed peer receives from its relay

# A state reply (``STATE``) that carries an outer-rounds member's momentum names each momentum
# tensor as this prefix + the parameter's name (asked for with ``StateRequest.outer_momentum``).
MOMENTUM_PREFIX = "outer_momentum/"

# Framing.
FRAME_HEADER_BYTES = 4
END_OF_STREAM = 0xFFFFFFFF  # a length header with this value ends one side of a stream
MAX_FRAME_BYTES = 4 * 1024 * 1024  # under hivemind's 4 MiB message cap
CHUNK_BYTES = 2 * 1024 * 1024  # tensor parts are at most this large
MAX_FRAMES = 1024  # per request
MAX_TIMEOUT = 600.0  # the largest deadline a StageRequest may ask for, seconds


class ErrorCode(str, Enum):
    """``error_code`` of a response (and the code of a failed call on the caller's side).

    A failed request changes nothing on the server. The first group is answered by servers;
    the second is what a caller records when no valid answer came back."""

    BAD_REQUEST = "bad_request"  # malformed, oversized or invalid: the caller's fault
    WRONG_SPEC = "wrong_spec"  # the request's spec digest is not the server's
    WRONG_STAGE = "wrong_stage"  # the server does not serve that stage (any more)
    CACHE_MISS = "cache_miss"  # backward without inputs for a forward the server no longer holds
    BUSY = "busy"  # the server is at capacity or closing its stage: retry elsewhere
    INTERNAL = "internal"  # the server failed
    NOT_FOUND = "not_found"  # no such checkpoint or file
    GONE = "gone"  # the checkpoint was removed while being read
    # Caller side only:
    TIMEOUT = "timeout"  # no answer within the deadline
    UNREACHABLE = "unreachable"  # no stream, or it broke before a whole answer
    BAD_RESPONSE = "bad_response"  # an answer that does not parse or does not fit the request

    def __str__(self) -> str:  # f-strings and logs show "bad_request", as on the wire
        return self.value
