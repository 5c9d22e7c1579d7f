{{/* Names are cut at 63 characters: the limit of a DNS label, which Service names become. */}}
{{- define "alignpro.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "alignpro.fullname" -}}
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

{{- define "alignpro.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Common labels; call with (dict "root" $ "component" "gateway"). */}}
{{- define "alignpro.labels" -}}
helm.sh/chart: {{ include "alignpro.chart" .root }}
{{ include "alignpro.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end }}

{{- define "alignpro.selectorLabels" -}}
app.kubernetes.io/name: {{ include "alignpro.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "alignpro.gateway.fullname" -}}
{{- printf "%s-gateway" (include "alignpro.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* One name per vLLM replica; call with (dict "root" $ "index" 0). Shortened so "-<index>" always fits. */}}
{{- define "alignpro.vllm.fullname" -}}
{{- printf "%s-vllm-%d" (include "alignpro.fullname" .root | trunc 55 | trimSuffix "-") (int .index) }}
{{- end }}

{{- define "alignpro.prompter.fullname" -}}
{{- printf "%s-prompter" (include "alignpro.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "alignpro.redis.fullname" -}}
{{- printf "%s-redis" (include "alignpro.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The Redis every gateway pod shares (rate limits, rewrite cache): the chart's own, an external one, or none. */}}
{{- define "alignpro.redis.url" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s:6379/0" (include "alignpro.redis.fullname" .) }}
{{- else if .Values.redis.externalUrl }}
{{- .Values.redis.externalUrl }}
{{- end }}
{{- end }}

{{- define "alignpro.secretName" -}}
{{- if .Values.secrets.create }}
{{- include "alignpro.fullname" . }}
{{- else }}
{{- required "secrets.existingSecret is required when secrets.create is false" .Values.secrets.existingSecret }}
{{- end }}
{{- end }}

{{- define "alignpro.gateway.image" -}}
{{- printf "%s:%s" .Values.gateway.image.repository (default .Chart.AppVersion .Values.gateway.image.tag) }}
{{- end }}

{{/* The base URLs the gateway spreads requests over, as a JSON list: one per in-chart replica, or the
     external ones. */}}
{{- define "alignpro.vllm.urls" -}}
{{- $urls := list }}
{{- if .Values.vllm.enabled }}
{{- range $i := until (int .Values.vllm.replicas) }}
{{- $urls = append $urls (printf "http://%s:8000/v1" (include "alignpro.vllm.fullname" (dict "root" $ "index" $i))) }}
{{- end }}
{{- else }}
{{- $urls = .Values.vllm.externalUrls }}
{{- end }}
{{- if not $urls }}
{{- fail "the gateway needs a backend: set vllm.enabled=true with vllm.replicas >= 1, or vllm.externalUrls" }}
{{- end }}
{{- toJson $urls }}
{{- end }}

{{/* The gateway's settings file: the user's gateway.config plus the engine `vllm` (and `prompter` when the chart
     runs the merged prompter). */}}
{{- define "alignpro.gateway.config" -}}
{{- $engine := dict "kind" "openai" "urls" (include "alignpro.vllm.urls" . | fromJsonArray) "model" .Values.vllm.model }}
{{- $engine = merge $engine (deepCopy .Values.gateway.engine) }}
{{- $config := deepCopy .Values.gateway.config }}
{{- $engines := merge (dict "vllm" $engine) (default dict $config.engines) }}
{{- if .Values.prompter.enabled }}
{{- $url := printf "http://%s:8000/v1" (include "alignpro.prompter.fullname" .) }}
{{- $prompter := merge (dict "kind" "openai" "urls" (list $url) "model" .Values.prompter.servedName) (deepCopy .Values.gateway.engine) }}
{{- $engines = merge (dict "prompter" $prompter) $engines }}
{{- end }}
{{- $_ := set $config "engines" $engines }}
{{- with include "alignpro.redis.url" . }}
{{- $_ := set $config "redis_url" . }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/* `vllm serve` flags. The image's entrypoint is `vllm serve`, so these are its arguments. */}}
{{- define "alignpro.vllm.args" -}}
- --model={{ .Values.vllm.model }}
- --port=8000
- --tensor-parallel-size={{ int .Values.vllm.tensorParallelSize }}
- --max-model-len={{ int .Values.vllm.maxModelLen }}
- --gpu-memory-utilization={{ .Values.vllm.gpuMemoryUtilization }}
{{- if .Values.vllm.lora.enabled }}
- --enable-lora
- --max-lora-rank={{ int .Values.vllm.lora.maxLoraRank }}
- --max-loras={{ len .Values.vllm.lora.modules }}
- --lora-modules
{{- range .Values.vllm.lora.modules }}
- {{ printf "%s=%s/%s" .name $.Values.vllm.lora.mountPath .path | quote }}
{{- end }}
{{- end }}
{{- with .Values.vllm.extraArgs }}
{{ toYaml . }}
{{- end }}
{{- end }}
