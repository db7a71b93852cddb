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

{{/* The gateway's config: the values' config with the port and the vLLM sidecar backend set. */}}
{{- define "llm-gateway.config" -}}
{{- $server := merge (dict "port" (int .Values.gateway.port)) (deepCopy (.Values.gateway.config.server | default dict)) -}}
{{- $backend := dict "url" (printf "http://127.0.0.1:%d" (int .Values.vllm.port)) "models" (list .Values.model.servedName) -}}
{{- $config := merge (dict "server" $server "backends" (list $backend)) (deepCopy .Values.gateway.config) -}}
{{- toYaml $config -}}
{{- end -}}
