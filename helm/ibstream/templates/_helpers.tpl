{{/* The chart's name. */}}
{{- define "ibstream.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The full name of the release's objects. */}}
{{- define "ibstream.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "ibstream.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "ibstream.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "ibstream.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "ibstream.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Labels selecting the pod. */}}
{{- define "ibstream.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ibstream.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The ServiceAccount's name. */}}
{{- define "ibstream.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "ibstream.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Where the credentials are mounted. */}}
{{- define "ibstream.secretsDir" -}}/etc/ibstream/secrets{{- end -}}

{{/* Turns the whole-number floats of a map (Helm reads every YAML number as a float) back into
     integers, in place and recursively: ibstream reads `replication_factor = 3`, not `3.0`. */}}
{{- define "ibstream.intify" -}}
{{- range $key, $value := . -}}
{{- if kindIs "map" $value -}}
{{- include "ibstream.intify" $value -}}
{{- else if and (kindIs "float64" $value) (eq (floor $value) $value) -}}
{{- $_ := set $ $key (int64 $value) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* ibstream's configuration as TOML: the values' `config`, with the credentials' *_file
     keys pointing at the mounted Secret. */}}
{{- define "ibstream.configToml" -}}
{{- $existing := required "existingSecret is required: the name of a Secret holding the CRM password and API key (the chart never takes credentials as values)" .Values.existingSecret -}}
{{- $config := deepCopy .Values.config -}}
{{- range $section, $keys := dict "crm" (list "password" "api_key") "kafka" (list "sasl_password") "schema_registry" (list "password") -}}
{{- range $key := $keys -}}
{{- if hasKey (default dict (get $config $section)) $key -}}
{{- fail (printf "config.%s.%s: credentials never go in values (they would land in the ConfigMap); put them in the Secret named by existingSecret, under secretKeys" $section $key) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $dir := include "ibstream.secretsDir" . -}}
{{- $crm := default dict $config.crm -}}
{{- $_ := set $crm "password_file" (printf "%s/%s" $dir .Values.secretKeys.crmPassword) -}}
{{- $_ := set $crm "api_key_file" (printf "%s/%s" $dir .Values.secretKeys.crmApiKey) -}}
{{- $_ := set $config "crm" $crm -}}
{{- if .Values.secretKeys.kafkaSaslPassword -}}
{{- $kafka := default dict $config.kafka -}}
{{- $_ := set $kafka "sasl_password_file" (printf "%s/%s" $dir .Values.secretKeys.kafkaSaslPassword) -}}
{{- $_ := set $config "kafka" $kafka -}}
{{- end -}}
{{- if .Values.secretKeys.registryPassword -}}
{{- $registry := required "config.schema_registry is required with secretKeys.registryPassword" $config.schema_registry -}}
{{- $_ := set $registry "password_file" (printf "%s/%s" $dir .Values.secretKeys.registryPassword) -}}
{{- end -}}
{{- include "ibstream.intify" $config -}}
{{- toToml $config -}}
{{- end -}}
