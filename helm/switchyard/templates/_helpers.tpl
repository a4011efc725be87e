{{/* Chart name, overridable. */}}
{{- define "switchyard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "<release>-<chart>" (or just the release when it already holds the chart name), at most 63 chars. */}}
{{- define "switchyard.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The namespace of every namespaced object: namespaceOverride, else the release's. */}}
{{- define "switchyard.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride }}
{{- end }}

{{- define "switchyard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "switchyard.labels" -}}
helm.sh/chart: {{ include "switchyard.chart" . }}
app.kubernetes.io/name: {{ include "switchyard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: switchyard
{{- with .Values.commonLabels }}
{{- range $key := list "helm.sh/chart" "app.kubernetes.io/name" "app.kubernetes.io/instance" "app.kubernetes.io/version" "app.kubernetes.io/managed-by" "app.kubernetes.io/part-of" "app.kubernetes.io/component" }}
{{- if hasKey $.Values.commonLabels $key }}
{{- fail (printf "commonLabels: %s is set by the chart (its selectors and discovery use these labels)" $key) }}
{{- end }}
{{- end }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Gateway: selector labels (immutable once installed: keep them minimal). */}}
{{- define "switchyard.gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "switchyard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "switchyard.gateway.labels" -}}
{{ include "switchyard.labels" . }}
app.kubernetes.io/component: gateway
{{- end }}

{{/*
Object names: one scheme per component. Every gateway object (Deployment, Service, ConfigMap, ServiceAccount,
Role, RoleBinding, PDB, HPA, Ingress, HTTPRoute, ServiceMonitor) is "<fullname>-gateway". Every worker object
is "<fullname>-<model>" (per model: Deployment, Service, ScaledObject) or "<fullname>-workers" (for all of them:
NetworkPolicy, PodMonitor), the prefix cut to 40 characters so model names up to 40 fit in 63.
*/}}
{{- define "switchyard.gateway.fullname" -}}
{{- printf "%s-gateway" (include "switchyard.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}

{{- define "switchyard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "switchyard.gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* An image reference from (dict "image" {repository, tag, digest} "root" $): repository@digest when a
digest is set (it pins the image, so the tag is left out), else repository:tag, the tag defaulting to appVersion. */}}
{{- define "switchyard.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}
{{- end }}

{{- define "switchyard.gateway.image" -}}
{{- include "switchyard.image" (dict "image" .Values.image "root" .) }}
{{- end }}

{{/*
The label selector the gateway's discovery uses. The worker Services carry these labels and the
EndpointSlice controller copies a Service's labels onto its slices.
*/}}
{{- define "switchyard.workerSelector" -}}
app.kubernetes.io/part-of=switchyard,app.kubernetes.io/component=worker,app.kubernetes.io/instance={{ .Release.Name }}
{{- end }}

{{/* Workers: called with (dict "root" $ "model" $model) where $model is already merged with workerDefaults. */}}
{{- define "switchyard.worker.fullname" -}}
{{- printf "%s-%s" (include "switchyard.fullname" .root | trunc 40 | trimSuffix "-") .model.name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Objects that cover every worker of the release (NetworkPolicy, PodMonitor): the worker scheme, "workers". */}}
{{- define "switchyard.workers.fullname" -}}
{{- include "switchyard.worker.fullname" (dict "root" . "model" (dict "name" "workers")) }}
{{- end }}

{{/* Selects every worker pod of the release, whatever its model. */}}
{{- define "switchyard.workers.selectorLabels" -}}
app.kubernetes.io/name: {{ include "switchyard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: worker
{{- end }}

{{- define "switchyard.worker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "switchyard.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: worker
switchyard.dev/model: {{ .model.name | quote }}
{{- end }}

{{- define "switchyard.worker.labels" -}}
{{ include "switchyard.labels" .root }}
app.kubernetes.io/component: worker
switchyard.dev/model: {{ .model.name | quote }}
{{- end }}

{{/* The first served name: vLLM's model_name metric label and the simulator's single name. */}}
{{- define "switchyard.worker.primaryName" -}}
{{- if .model.servedNames }}{{ first .model.servedNames }}{{ else }}{{ .model.name }}{{ end }}
{{- end }}

{{/*
The models list with workerDefaults merged into each entry, as JSON {"models": [...]} (templates cannot
return lists). Per-model keys win; nested maps merge key by key; lists replace.
*/}}
{{- define "switchyard.models" -}}
{{- $models := list }}
{{- range .Values.models }}
{{- $base := deepCopy $.Values.workerDefaults }}
{{- if .simulator }}
{{- /* The simulator needs no GPU and little memory: size it so unless the entry says otherwise. */}}
{{- $_ := set $base "resources" (dict "requests" (dict "cpu" "100m" "memory" "128Mi") "limits" (dict "memory" "512Mi")) }}
{{- $_ := set $base "gpus" 0 }}
{{- $_ := set $base "shmSize" "64Mi" }}
{{- $_ := set $base "cache" (dict "type" "emptyDir" "sizeLimit" "1Gi" "claimName" "") }}
{{- $_ := set $base "startupProbe" (dict "periodSeconds" 2 "failureThreshold" 30) }}
{{- $_ := set $base "terminationGracePeriodSeconds" 30 }}
{{- /* workerDefaults.vllmArgs are for vLLM (e.g. --gpu-memory-utilization): the simulator gets its entry's only. */}}
{{- $_ := set $base "vllmArgs" list }}
{{- /* The simulator writes nothing: a read-only root unless the entry says otherwise. */}}
{{- $_ := set $base "securityContext" (merge (dict "readOnlyRootFilesystem" true) ($base.securityContext | default dict)) }}
{{- end }}
{{- $models = append $models (mergeOverwrite $base (deepCopy .)) }}
{{- end }}
{{- dict "models" $models | toJson }}
{{- end }}

{{/*
Tracing (OpenTelemetry over OTLP). "switchyard.tracing.check" fails on inconsistent values and renders nothing;
the gateway's ConfigMap and Deployment and every worker include it, so any render with tracing on checks them.
*/}}
{{- define "switchyard.tracing.check" -}}
{{- $t := .Values.tracing }}
{{- if $t.enabled }}
{{- if not $t.endpoint }}
{{- fail "tracing.enabled is true but tracing.endpoint is empty: set it to the OTLP collector's URL, e.g. http://otel-collector.observability:4318 (http/protobuf) or http://otel-collector.observability:4317 (grpc)" }}
{{- end }}
{{- if and (include "switchyard.tracing.samplerArg" .) (not $t.sampler) }}
{{- fail "tracing.samplerArg is set but tracing.sampler is empty: set the sampler it is the argument of, e.g. parentbased_traceidratio" }}
{{- end }}
{{- end }}
{{- end }}

{{/* vLLM's --otlp-traces-endpoint: the full traces URL over http/protobuf (vLLM's exporter appends no path),
the endpoint as it is over grpc. */}}
{{- define "switchyard.tracing.workerEndpoint" -}}
{{- $t := .Values.tracing }}
{{- if eq $t.protocol "grpc" }}
{{- $t.endpoint }}
{{- else }}
{{- printf "%s/v1/traces" ($t.endpoint | trimSuffix "/") }}
{{- end }}
{{- end }}

{{/* OTEL_* env vars, as a YAML list of EnvVar, from (dict "vars" (list (list NAME VALUE) ...) "env" $userEnv):
pairs with an empty value are left out, and so are the names the user's own env list sets (theirs win). */}}
{{- define "switchyard.tracing.env" -}}
{{- $taken := dict }}
{{- range .env }}
{{- if kindIs "map" . }}
{{- $_ := set $taken (toString .name) true }}
{{- end }}
{{- end }}
{{- range .vars }}
{{- $name := index . 0 }}
{{- $value := toString (index . 1) }}
{{- if and (ne $value "") (not (hasKey $taken $name)) }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* tracing.samplerArg as a string ("" when unset); a number such as 0.1 is written as it reads. */}}
{{- define "switchyard.tracing.samplerArg" -}}
{{- if not (kindIs "invalid" .Values.tracing.samplerArg) }}{{ toString .Values.tracing.samplerArg }}{{ end }}
{{- end }}
