{{/* Names, labels and the rules every template shares. */}}

{{/* The release's base name, at most 40 characters so pool suffixes fit in 63. */}}
{{- define "kiln.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kiln.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Selector labels of one component: include "kiln.selector" (list $ "coordinator") */}}
{{- define "kiln.selector" -}}
{{- $ := index . 0 -}}
app.kubernetes.io/name: {{ $.Chart.Name }}
app.kubernetes.io/instance: {{ $.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "kiln.coordinator.name" -}}{{ include "kiln.fullname" . }}-coordinator{{- end -}}
{{- define "kiln.redis.name" -}}{{ include "kiln.fullname" . }}-redis{{- end -}}

{{/* The store: "redis" (bundled or external) or "memory". */}}
{{- define "kiln.store.kind" -}}
{{- if or .Values.redis.enabled .Values.redis.url -}}redis{{- else -}}memory{{- end -}}
{{- end -}}

{{/* Coordinator replicas: the value, else 2 with Redis and 1 with the memory store (which cannot be shared). */}}
{{- define "kiln.coordinator.replicas" -}}
{{- $kind := include "kiln.store.kind" . -}}
{{- if eq $kind "memory" -}}
1
{{- else if .Values.coordinator.replicas -}}
{{- .Values.coordinator.replicas -}}
{{- else -}}
2
{{- end -}}
{{- end -}}

{{/* The Secret holding the Redis password and its key ("" without a password). */}}
{{- define "kiln.redis.secretName" -}}
{{- if .Values.redis.existingSecret -}}{{ .Values.redis.existingSecret }}{{- else if .Values.redis.enabled -}}{{ include "kiln.redis.name" . }}{{- end -}}
{{- end -}}

{{/* The store URL given to the coordinator; $(KILN_REDIS_PASSWORD) is expanded by the kubelet from the Secret. */}}
{{- define "kiln.store.url" -}}
{{- $secret := include "kiln.redis.secretName" . -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://:$(KILN_REDIS_PASSWORD)@%s:6379/0" (include "kiln.redis.name" .) -}}
{{- else if .Values.redis.url -}}
{{- if $secret -}}
{{- regexReplaceAll "^(rediss?://)" .Values.redis.url "${1}:$(KILN_REDIS_PASSWORD)@" -}}
{{- else -}}
{{- .Values.redis.url -}}
{{- end -}}
{{- else -}}
memory
{{- end -}}
{{- end -}}

{{/* Coordinator URL as workers see it (through the Service). */}}
{{- define "kiln.coordinator.url" -}}
{{- printf "%s://%s.%s.svc:%d" (ternary "https" "http" .Values.tls.enabled) (include "kiln.coordinator.name" .) .Release.Namespace (int .Values.coordinator.grpcPort) -}}
{{- end -}}

{{/* The coordinator's HTTP side door as KEDA sees it. */}}
{{- define "kiln.coordinator.httpUrl" -}}
{{- printf "http://%s.%s.svc:%d" (include "kiln.coordinator.name" .) .Release.Namespace (int .Values.coordinator.httpPort) -}}
{{- end -}}

{{/* GJSON path of a model's queued tasks in /api/v1/queue: dots in model names are escaped. */}}
{{- define "kiln.gjson.queued" -}}
{{- printf "models.%s.queued" (replace "." "\\." .) -}}
{{- end -}}

{{/* Image reference: include "kiln.image" (list $ .Values.coordinator.image) */}}
{{- define "kiln.image" -}}
{{- $ := index . 0 -}}
{{- $img := index . 1 -}}
{{- printf "%s:%s" $img.repository (default $.Chart.AppVersion $img.tag) -}}
{{- end -}}

{{/* Pod-level security context shared by kiln pods (the images run as uid 10001). */}}
{{- define "kiln.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "kiln.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* The secret with the S3 credentials of results (and models). */}}
{{- define "kiln.s3.env" -}}
{{- with .Values.s3 }}
{{- if .existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: {name: {{ .existingSecret | quote }}, key: {{ .accessKeyIdKey | quote }}}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ .existingSecret | quote }}, key: {{ .secretAccessKeyKey | quote }}}
{{- end }}
{{- if .region }}
- name: AWS_REGION
  value: {{ .region | quote }}
{{- end }}
{{- if .endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ .endpoint | quote }}
{{- if hasPrefix "http://" .endpoint }}
- name: AWS_ALLOW_HTTP
  value: "true"
{{- end }}
{{- end }}
{{- end }}
{{- end -}}
