from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SearchRequest(_message.Message):
    __slots__ = ("image", "top_k", "min_detection_score", "labels", "user_id", "no_cache")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_DETECTION_SCORE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    NO_CACHE_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    top_k: int
    min_detection_score: float
    labels: _containers.RepeatedScalarFieldContainer[str]
    user_id: str
    no_cache: bool
    def __init__(self, image: _Optional[bytes] = ..., top_k: _Optional[int] = ..., min_detection_score: _Optional[float] = ..., labels: _Optional[_Iterable[str]] = ..., user_id: _Optional[str] = ..., no_cache: _Optional[bool] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("x_min", "y_min", "x_max", "y_max")
    X_MIN_FIELD_NUMBER: _ClassVar[int]
    Y_MIN_FIELD_NUMBER: _ClassVar[int]
    X_MAX_FIELD_NUMBER: _ClassVar[int]
    Y_MAX_FIELD_NUMBER: _ClassVar[int]
    x_min: float
    y_min: float
    x_max: float
    y_max: float
    def __init__(self, x_min: _Optional[float] = ..., y_min: _Optional[float] = ..., x_max: _Optional[float] = ..., y_max: _Optional[float] = ...) -> None: ...

class Match(_message.Message):
    __slots__ = ("item_id", "score", "shard", "attributes")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    shard: str
    attributes: _containers.ScalarMap[str, str]
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ..., shard: _Optional[str] = ..., attributes: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Detection(_message.Message):
    __slots__ = ("box", "label", "score", "matches")
    BOX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    MATCHES_FIELD_NUMBER: _ClassVar[int]
    box: Box
    label: str
    score: float
    matches: _containers.RepeatedCompositeFieldContainer[Match]
    def __init__(self, box: _Optional[_Union[Box, _Mapping]] = ..., label: _Optional[str] = ..., score: _Optional[float] = ..., matches: _Optional[_Iterable[_Union[Match, _Mapping]]] = ...) -> None: ...

class Coverage(_message.Message):
    __slots__ = ("shards_answered", "shards_expected", "missing_shards")
    SHARDS_ANSWERED_FIELD_NUMBER: _ClassVar[int]
    SHARDS_EXPECTED_FIELD_NUMBER: _ClassVar[int]
    MISSING_SHARDS_FIELD_NUMBER: _ClassVar[int]
    shards_answered: int
    shards_expected: int
    missing_shards: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, shards_answered: _Optional[int] = ..., shards_expected: _Optional[int] = ..., missing_shards: _Optional[_Iterable[str]] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("detections", "coverage", "versions", "trace_id", "cached", "arms")
    class VersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class ArmsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    ARMS_FIELD_NUMBER: _ClassVar[int]
    detections: _containers.RepeatedCompositeFieldContainer[Detection]
    coverage: Coverage
    versions: _containers.ScalarMap[str, str]
    trace_id: str
    cached: bool
    arms: _containers.ScalarMap[str, str]
    def __init__(self, detections: _Optional[_Iterable[_Union[Detection, _Mapping]]] = ..., coverage: _Optional[_Union[Coverage, _Mapping]] = ..., versions: _Optional[_Mapping[str, str]] = ..., trace_id: _Optional[str] = ..., cached: _Optional[bool] = ..., arms: _Optional[_Mapping[str, str]] = ...) -> None: ...
