//! The OpenAPI 3.1 document served at `/v1/openapi.json`.

use serde_json::{json, Value};

pub fn document() -> Value {
    let error = json!({"$ref": "#/components/schemas/Error"});
    let err = |description: &str| json!({"description": description, "content": {"application/json": {"schema": error}}});
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "llmtrace-rotator",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Rotate database credentials on demand and see what the rotator did. Every /v1 route needs `Authorization: Bearer <token>`."
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/rotations": {
                "post": {
                    "summary": "Start a rotation (or a dry run) of some or all targets",
                    "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RotateRequest"}}}},
                    "responses": {
                        "202": {"description": "Started", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Started"}}}},
                        "200": {"description": "Dry run: the plan and the read-only preflight", "content": {"application/json": {"schema": {"type": "object"}}}},
                        "400": err("Malformed request"),
                        "401": err("Missing or unknown bearer token"),
                        "404": err("Unknown target"),
                        "409": err("A target is rotating already"),
                        "413": err("Body over 64 KiB")
                    }
                },
                "get": {
                    "summary": "Recent runs, newest first",
                    "parameters": [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 20}}],
                    "responses": {"200": {"description": "Runs", "content": {"application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/Run"}}}}}, "400": err("Bad limit"), "401": err("Missing or unknown bearer token")}
                }
            },
            "/v1/rotations/{id}": {
                "get": {
                    "summary": "One run: its steps, outcome and durations",
                    "parameters": [
                        {"name": "id", "in": "path", "required": true, "schema": {"type": "string"}},
                        {"name": "wait", "in": "query", "required": false, "description": "Answer once the run has an outcome or after this long, whichever is first (a duration like 30s, at most 300s); without it, at once", "schema": {"type": "string"}}
                    ],
                    "responses": {"200": {"description": "The run", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Run"}}}}, "401": err("Missing or unknown bearer token"), "400": err("wait is not a duration of at most 300s"), "404": err("No such run")}
                }
            },
            "/v1/targets": {
                "get": {
                    "summary": "Every target: last outcome, last success, credential age, next scheduled run, drift",
                    "responses": {"200": {"description": "Targets", "content": {"application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/Target"}}}}}, "401": err("Missing or unknown bearer token")}
                }
            },
            "/v1/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI document"}}}},
            "/healthz": {"get": {"summary": "Liveness", "security": [], "responses": {"200": {"description": "Alive"}}}},
            "/readyz": {"get": {"summary": "Readiness: the journal answers", "security": [], "responses": {"200": {"description": "Ready"}, "503": err("Journal unreachable")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "security": [], "responses": {"200": {"description": "Text exposition format"}}}}
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
                "RotateRequest": {
                    "type": "object",
                    "additionalProperties": false,
                    "properties": {
                        "targets": {"type": "array", "items": {"type": "string"}, "description": "Target names; all targets when absent or empty"},
                        "dry_run": {"type": "boolean", "default": false}
                    }
                },
                "Started": {"type": "object", "required": ["id", "status_url"], "properties": {"id": {"type": "string"}, "status_url": {"type": "string"}}},
                "Step": {
                    "type": "object",
                    "properties": {
                        "seq": {"type": "integer"}, "step": {"type": "string"}, "subject": {"type": "string"},
                        "status": {"type": "string", "enum": ["started", "ok", "failed"]},
                        "started_at": {"type": "integer", "description": "Unix milliseconds"},
                        "duration_ms": {"type": ["integer", "null"]}, "error": {"type": "string"}
                    }
                },
                "Run": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"}, "trigger": {"type": "string", "enum": ["cli", "api", "schedule", "recovery"]},
                        "targets": {"type": "array", "items": {"type": "string"}},
                        "started_at": {"type": "integer"}, "finished_at": {"type": ["integer", "null"]},
                        "outcome": {"type": ["string", "null"], "enum": ["succeeded", "refused", "rolled_back", "rollback_failed", null]},
                        "steps": {"type": "array", "items": {"$ref": "#/components/schemas/Step"}}
                    }
                },
                "Target": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "last_outcome": {"type": ["string", "null"]},
                        "last_attempt": {"type": ["string", "null"], "format": "date-time"},
                        "last_success": {"type": ["string", "null"], "format": "date-time"},
                        "credential_age_seconds": {"type": ["number", "null"]},
                        "next_scheduled_run": {"type": ["string", "null"], "format": "date-time"},
                        "credential_valid": {"type": ["boolean", "null"]},
                        "rotating": {"type": "boolean"}
                    }
                }
            }
        }
    })
}
