"""barge.disk: sparse I/O, codecs, and barge's chunk/frame disk format (docs/format.md).

The format's public API is re-exported here; the Tart/Vetu/Apple-LZ4 readers live in their own
modules of this package.
"""

from barge.disk.chunker import (
    ChunkDigests,
    ChunkPlan,
    EncodedChunk,
    EncodeStream,
    encode_chunk,
    hash_chunk,
    iter_encoded_chunk,
    plan_chunks,
)
from barge.disk.codec import DEFAULT_CODEC, Codec, parse_codec
from barge.disk.decoder import DecodeBuffers, decode_chunk, decode_frame, write_zero_aware
from barge.disk.index import (
    ANNOTATION_DIGEST,
    ANNOTATION_LENGTH,
    ANNOTATION_NAME,
    ANNOTATION_OFFSET,
    CHUNK_MEDIA_TYPE,
    INDEX_MEDIA_TYPE,
    ChunkMeta,
    DiskIndex,
    FrameIndex,
    FrameInfo,
    FrameRef,
    chunk_annotations,
    chunk_media_type,
    parse_chunk_annotations,
    validate_disk_name,
    validate_layout,
    zero_digest,
)
from barge.disk.sizing import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_FRAME_SIZE,
    SizingDecision,
    choose_chunk_size,
)

__all__ = [
    "ANNOTATION_DIGEST",
    "ANNOTATION_LENGTH",
    "ANNOTATION_NAME",
    "ANNOTATION_OFFSET",
    "CHUNK_MEDIA_TYPE",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_CODEC",
    "DEFAULT_FRAME_SIZE",
    "INDEX_MEDIA_TYPE",
    "ChunkDigests",
    "ChunkMeta",
    "ChunkPlan",
    "Codec",
    "DecodeBuffers",
    "DiskIndex",
    "EncodeStream",
    "EncodedChunk",
    "FrameIndex",
    "FrameInfo",
    "FrameRef",
    "SizingDecision",
    "choose_chunk_size",
    "chunk_annotations",
    "chunk_media_type",
    "decode_chunk",
    "decode_frame",
    "encode_chunk",
    "hash_chunk",
    "iter_encoded_chunk",
    "parse_chunk_annotations",
    "parse_codec",
    "plan_chunks",
    "validate_disk_name",
    "validate_layout",
    "write_zero_aware",
    "zero_digest",
]
