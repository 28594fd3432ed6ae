{{/*
An image reference from {repository, tag, digest}: the tag defaults to the chart's
appVersion; a digest pins the exact image (repository:tag@sha256:...), so a re-tagged
registry image can never change what runs.
Call: include "tether.imageRef" (dict "root" . "image" .Values.image)
*/}}
{{- define "tether.imageRef" -}}
{{- $tag := default .root.Chart.AppVersion .image.tag -}}
{{- if .image.digest -}}
{{- printf "%s:%s@%s" .image.repository $tag .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end -}}
