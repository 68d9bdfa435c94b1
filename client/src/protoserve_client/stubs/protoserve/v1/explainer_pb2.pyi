from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HeatmapMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HEATMAP_MODE_NONE: _ClassVar[HeatmapMode]
    HEATMAP_MODE_FEATURE_GRID: _ClassVar[HeatmapMode]
    HEATMAP_MODE_INPUT: _ClassVar[HeatmapMode]
    HEATMAP_MODE_PRESENCE_FEATURE_GRID: _ClassVar[HeatmapMode]
    HEATMAP_MODE_PRESENCE_INPUT: _ClassVar[HeatmapMode]
HEATMAP_MODE_NONE: HeatmapMode
HEATMAP_MODE_FEATURE_GRID: HeatmapMode
HEATMAP_MODE_INPUT: HeatmapMode
HEATMAP_MODE_PRESENCE_FEATURE_GRID: HeatmapMode
HEATMAP_MODE_PRESENCE_INPUT: HeatmapMode

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Intervention(_message.Message):
    __slots__ = ("suppress",)
    SUPPRESS_FIELD_NUMBER: _ClassVar[int]
    suppress: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, suppress: _Optional[_Iterable[str]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("model", "version", "input", "image", "top_k", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    input: Tensor
    image: bytes
    top_k: int
    request_id: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., input: _Optional[_Union[Tensor, _Mapping]] = ..., image: _Optional[bytes] = ..., top_k: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("request_id", "model", "version", "prediction")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    version: str
    prediction: _containers.RepeatedCompositeFieldContainer[ClassScore]
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[str] = ..., prediction: _Optional[_Iterable[_Union[ClassScore, _Mapping]]] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("model", "version", "method", "input", "image", "top_k", "target_class", "heatmaps", "interventions", "request_id", "neighbours")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TARGET_CLASS_FIELD_NUMBER: _ClassVar[int]
    HEATMAPS_FIELD_NUMBER: _ClassVar[int]
    INTERVENTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    method: str
    input: Tensor
    image: bytes
    top_k: int
    target_class: int
    heatmaps: HeatmapMode
    interventions: _containers.RepeatedCompositeFieldContainer[Intervention]
    request_id: str
    neighbours: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., method: _Optional[str] = ..., input: _Optional[_Union[Tensor, _Mapping]] = ..., image: _Optional[bytes] = ..., top_k: _Optional[int] = ..., target_class: _Optional[int] = ..., heatmaps: _Optional[_Union[HeatmapMode, str]] = ..., interventions: _Optional[_Iterable[_Union[Intervention, _Mapping]]] = ..., request_id: _Optional[str] = ..., neighbours: _Optional[int] = ...) -> None: ...

class ClassScore(_message.Message):
    __slots__ = ("class_index", "label", "logit", "probability")
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    LOGIT_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    class_index: int
    label: str
    logit: float
    probability: float
    def __init__(self, class_index: _Optional[int] = ..., label: _Optional[str] = ..., logit: _Optional[float] = ..., probability: _Optional[float] = ...) -> None: ...

class Component(_message.Message):
    __slots__ = ("id", "label", "class_index", "weight", "contribution")
    ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    id: str
    label: str
    class_index: int
    weight: float
    contribution: float
    def __init__(self, id: _Optional[str] = ..., label: _Optional[str] = ..., class_index: _Optional[int] = ..., weight: _Optional[float] = ..., contribution: _Optional[float] = ...) -> None: ...

class Heatmap(_message.Message):
    __slots__ = ("component_id", "map")
    COMPONENT_ID_FIELD_NUMBER: _ClassVar[int]
    MAP_FIELD_NUMBER: _ClassVar[int]
    component_id: str
    map: Tensor
    def __init__(self, component_id: _Optional[str] = ..., map: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class InterventionResult(_message.Message):
    __slots__ = ("suppressed", "prediction", "target_logit")
    SUPPRESSED_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    TARGET_LOGIT_FIELD_NUMBER: _ClassVar[int]
    suppressed: _containers.RepeatedScalarFieldContainer[str]
    prediction: _containers.RepeatedCompositeFieldContainer[ClassScore]
    target_logit: float
    def __init__(self, suppressed: _Optional[_Iterable[str]] = ..., prediction: _Optional[_Iterable[_Union[ClassScore, _Mapping]]] = ..., target_logit: _Optional[float] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("request_id", "model", "version", "method", "prediction", "target_class", "target_logit", "components", "bias", "residual_contribution", "residual_share", "heatmaps", "interventions", "additive", "additivity_gap", "residual_heatmap", "neighbours", "neighbour_components")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    TARGET_CLASS_FIELD_NUMBER: _ClassVar[int]
    TARGET_LOGIT_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_SHARE_FIELD_NUMBER: _ClassVar[int]
    HEATMAPS_FIELD_NUMBER: _ClassVar[int]
    INTERVENTIONS_FIELD_NUMBER: _ClassVar[int]
    ADDITIVE_FIELD_NUMBER: _ClassVar[int]
    ADDITIVITY_GAP_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_HEATMAP_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOUR_COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    version: str
    method: str
    prediction: _containers.RepeatedCompositeFieldContainer[ClassScore]
    target_class: int
    target_logit: float
    components: _containers.RepeatedCompositeFieldContainer[Component]
    bias: float
    residual_contribution: float
    residual_share: float
    heatmaps: _containers.RepeatedCompositeFieldContainer[Heatmap]
    interventions: _containers.RepeatedCompositeFieldContainer[InterventionResult]
    additive: bool
    additivity_gap: float
    residual_heatmap: Heatmap
    neighbours: _containers.RepeatedCompositeFieldContainer[Neighbour]
    neighbour_components: _containers.RepeatedCompositeFieldContainer[ComponentShare]
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[str] = ..., method: _Optional[str] = ..., prediction: _Optional[_Iterable[_Union[ClassScore, _Mapping]]] = ..., target_class: _Optional[int] = ..., target_logit: _Optional[float] = ..., components: _Optional[_Iterable[_Union[Component, _Mapping]]] = ..., bias: _Optional[float] = ..., residual_contribution: _Optional[float] = ..., residual_share: _Optional[float] = ..., heatmaps: _Optional[_Iterable[_Union[Heatmap, _Mapping]]] = ..., interventions: _Optional[_Iterable[_Union[InterventionResult, _Mapping]]] = ..., additive: _Optional[bool] = ..., additivity_gap: _Optional[float] = ..., residual_heatmap: _Optional[_Union[Heatmap, _Mapping]] = ..., neighbours: _Optional[_Iterable[_Union[Neighbour, _Mapping]]] = ..., neighbour_components: _Optional[_Iterable[_Union[ComponentShare, _Mapping]]] = ...) -> None: ...

class Neighbour(_message.Message):
    __slots__ = ("probe_index", "distance", "class_index", "label", "component_id", "png")
    PROBE_INDEX_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    COMPONENT_ID_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    probe_index: int
    distance: float
    class_index: int
    label: str
    component_id: str
    png: bytes
    def __init__(self, probe_index: _Optional[int] = ..., distance: _Optional[float] = ..., class_index: _Optional[int] = ..., label: _Optional[str] = ..., component_id: _Optional[str] = ..., png: _Optional[bytes] = ...) -> None: ...

class ComponentShare(_message.Message):
    __slots__ = ("component_id", "share")
    COMPONENT_ID_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    component_id: str
    share: float
    def __init__(self, component_id: _Optional[str] = ..., share: _Optional[float] = ...) -> None: ...

class StreamError(_message.Message):
    __slots__ = ("code", "message", "field")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    field: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., field: _Optional[str] = ...) -> None: ...

class ExplainStreamResponse(_message.Message):
    __slots__ = ("request_id", "response", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    response: ExplainResponse
    error: StreamError
    def __init__(self, request_id: _Optional[str] = ..., response: _Optional[_Union[ExplainResponse, _Mapping]] = ..., error: _Optional[_Union[StreamError, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class ComponentInfo(_message.Message):
    __slots__ = ("id", "label", "class_index", "exemplar_png")
    ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    EXEMPLAR_PNG_FIELD_NUMBER: _ClassVar[int]
    id: str
    label: str
    class_index: int
    exemplar_png: bytes
    def __init__(self, id: _Optional[str] = ..., label: _Optional[str] = ..., class_index: _Optional[int] = ..., exemplar_png: _Optional[bytes] = ...) -> None: ...

class MethodInfo(_message.Message):
    __slots__ = ("name", "additive", "residual_share_definition", "components", "fit_report_json", "contribution_definition", "presence_maps")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDITIVE_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_SHARE_DEFINITION_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    FIT_REPORT_JSON_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_DEFINITION_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_MAPS_FIELD_NUMBER: _ClassVar[int]
    name: str
    additive: bool
    residual_share_definition: str
    components: _containers.RepeatedCompositeFieldContainer[ComponentInfo]
    fit_report_json: str
    contribution_definition: str
    presence_maps: bool
    def __init__(self, name: _Optional[str] = ..., additive: _Optional[bool] = ..., residual_share_definition: _Optional[str] = ..., components: _Optional[_Iterable[_Union[ComponentInfo, _Mapping]]] = ..., fit_report_json: _Optional[str] = ..., contribution_definition: _Optional[str] = ..., presence_maps: _Optional[bool] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "input_dtype", "input_shape", "labels", "methods", "default_method", "layer", "feature_shape", "backend", "execution_provider", "samples", "image_mode")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_METHOD_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_MODE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    input_dtype: str
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    labels: _containers.RepeatedScalarFieldContainer[str]
    methods: _containers.RepeatedCompositeFieldContainer[MethodInfo]
    default_method: str
    layer: str
    feature_shape: _containers.RepeatedScalarFieldContainer[int]
    backend: str
    execution_provider: str
    samples: _containers.RepeatedCompositeFieldContainer[SampleInfo]
    image_mode: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., input_dtype: _Optional[str] = ..., input_shape: _Optional[_Iterable[int]] = ..., labels: _Optional[_Iterable[str]] = ..., methods: _Optional[_Iterable[_Union[MethodInfo, _Mapping]]] = ..., default_method: _Optional[str] = ..., layer: _Optional[str] = ..., feature_shape: _Optional[_Iterable[int]] = ..., backend: _Optional[str] = ..., execution_provider: _Optional[str] = ..., samples: _Optional[_Iterable[_Union[SampleInfo, _Mapping]]] = ..., image_mode: _Optional[str] = ...) -> None: ...

class SampleInfo(_message.Message):
    __slots__ = ("index", "class_index", "label", "input")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    index: int
    class_index: int
    label: str
    input: Tensor
    def __init__(self, index: _Optional[int] = ..., class_index: _Optional[int] = ..., label: _Optional[str] = ..., input: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
