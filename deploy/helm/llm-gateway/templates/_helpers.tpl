{{- define "llm-gateway.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "llm-gateway.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "llm-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llm-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "llm-gateway.labels" -}}
{{ include "llm-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "llm-gateway.metricsService" -}}
{{- printf "%s-metrics" (include "llm-gateway.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "llm-gateway.serviceAccount" -}}
{{- if .Values.serviceAccount.create -}}{{ include "llm-gateway.fullname" . }}{{- else -}}default{{- end -}}
{{- end -}}

{{/* The gateway's config: the values' config with the port, the vLLM sidecar backend and, with
cache.enabled, the cache's storage set. */}}
{{- define "llm-gateway.config" -}}
{{- $server := merge (dict "port" (int .Values.gateway.port)) (deepCopy (.Values.gateway.config.server | default dict)) -}}
{{- $backend := dict "url" (printf "http://127.0.0.1:%d" (int .Values.vllm.port)) "models" (list .Values.model.servedName) -}}
{{- $config := merge (dict "server" $server "backends" (list $backend)) (deepCopy .Values.gateway.config) -}}
{{- if .Values.cache.enabled -}}
{{- if not (or .Values.cache.storage .Values.cache.storageSecret.name) -}}
{{- fail "cache.enabled: set cache.storage (a Redis URL) or cache.storageSecret.name" -}}
{{- end -}}
{{- $cache := deepCopy (.Values.gateway.config.cache | default dict) -}}
{{- if .Values.cache.storage -}}
{{- $_ := set $cache "storage" .Values.cache.storage -}}
{{- end -}}
{{- $_ := set $config "cache" $cache -}}
{{- else if .Values.gateway.config.cache -}}
{{- fail "gateway.config.cache is set but cache.enabled is false: the cache would be on; set cache.enabled" -}}
{{- end -}}
{{- toYaml $config -}}
{{- end -}}

{{/* Whether the gateway gets the cache's Redis URL from a Secret (an environment variable). */}}
{{- define "llm-gateway.cacheFromSecret" -}}
{{- if and .Values.cache.enabled .Values.cache.storageSecret.name -}}true{{- end -}}
{{- end -}}
