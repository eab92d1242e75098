from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VerdictStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERDICT_STATUS_UNSPECIFIED: _ClassVar[VerdictStatus]
    VERDICT_STATUS_OK: _ClassVar[VerdictStatus]
    VERDICT_STATUS_TIMEOUT: _ClassVar[VerdictStatus]
    VERDICT_STATUS_UNAVAILABLE: _ClassVar[VerdictStatus]
    VERDICT_STATUS_DISABLED: _ClassVar[VerdictStatus]
    VERDICT_STATUS_ERROR: _ClassVar[VerdictStatus]

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    DECISION_ALLOW: _ClassVar[Decision]
    DECISION_REVIEW: _ClassVar[Decision]
    DECISION_BLOCK: _ClassVar[Decision]
VERDICT_STATUS_UNSPECIFIED: VerdictStatus
VERDICT_STATUS_OK: VerdictStatus
VERDICT_STATUS_TIMEOUT: VerdictStatus
VERDICT_STATUS_UNAVAILABLE: VerdictStatus
VERDICT_STATUS_DISABLED: VerdictStatus
VERDICT_STATUS_ERROR: VerdictStatus
DECISION_UNSPECIFIED: Decision
DECISION_ALLOW: Decision
DECISION_REVIEW: Decision
DECISION_BLOCK: Decision

class Listing(_message.Message):
    __slots__ = ("listing_id", "title", "description", "images", "price_cents", "category", "attributes")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    LISTING_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    PRICE_CENTS_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    listing_id: str
    title: str
    description: str
    images: _containers.RepeatedScalarFieldContainer[bytes]
    price_cents: int
    category: str
    attributes: _containers.ScalarMap[str, str]
    def __init__(self, listing_id: _Optional[str] = ..., title: _Optional[str] = ..., description: _Optional[str] = ..., images: _Optional[_Iterable[bytes]] = ..., price_cents: _Optional[int] = ..., category: _Optional[str] = ..., attributes: _Optional[_Mapping[str, str]] = ...) -> None: ...

class CheckRequest(_message.Message):
    __slots__ = ("listing", "models")
    LISTING_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    listing: Listing
    models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, listing: _Optional[_Union[Listing, _Mapping]] = ..., models: _Optional[_Iterable[str]] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("model", "version", "score", "flagged", "status", "threshold", "detail", "review_threshold", "label", "latency_ms", "cached", "arm")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    REVIEW_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    score: float
    flagged: bool
    status: VerdictStatus
    threshold: float
    detail: str
    review_threshold: float
    label: str
    latency_ms: float
    cached: bool
    arm: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., score: _Optional[float] = ..., flagged: _Optional[bool] = ..., status: _Optional[_Union[VerdictStatus, str]] = ..., threshold: _Optional[float] = ..., detail: _Optional[str] = ..., review_threshold: _Optional[float] = ..., label: _Optional[str] = ..., latency_ms: _Optional[float] = ..., cached: _Optional[bool] = ..., arm: _Optional[str] = ...) -> None: ...

class CategorySuggestion(_message.Message):
    __slots__ = ("category", "score")
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    category: str
    score: float
    def __init__(self, category: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class CheckResponse(_message.Message):
    __slots__ = ("verdicts", "partial", "flagged", "trace_id", "decision", "reasons", "policy_version", "versions", "suggestions")
    class VersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VERDICTS_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    SUGGESTIONS_FIELD_NUMBER: _ClassVar[int]
    verdicts: _containers.RepeatedCompositeFieldContainer[Verdict]
    partial: bool
    flagged: bool
    trace_id: str
    decision: Decision
    reasons: _containers.RepeatedScalarFieldContainer[str]
    policy_version: str
    versions: _containers.ScalarMap[str, str]
    suggestions: _containers.RepeatedCompositeFieldContainer[CategorySuggestion]
    def __init__(self, verdicts: _Optional[_Iterable[_Union[Verdict, _Mapping]]] = ..., partial: _Optional[bool] = ..., flagged: _Optional[bool] = ..., trace_id: _Optional[str] = ..., decision: _Optional[_Union[Decision, str]] = ..., reasons: _Optional[_Iterable[str]] = ..., policy_version: _Optional[str] = ..., versions: _Optional[_Mapping[str, str]] = ..., suggestions: _Optional[_Iterable[_Union[CategorySuggestion, _Mapping]]] = ...) -> None: ...
