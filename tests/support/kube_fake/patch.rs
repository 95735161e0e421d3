//! JSON merge patch (RFC 7386) and strategic merge patch.

use serde_json::{json, Value};

/// RFC 7386 JSON merge patch: objects merge recursively, null deletes, anything
/// else (arrays included) replaces.
pub(super) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().unwrap();
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// Merge keys of the lists the apiserver merges element-wise in a strategic merge
/// patch (from the `patchMergeKey` tags of the core/apps types). Matched by field
/// name only, which is unambiguous within Secrets and workloads.
pub(super) fn merge_key(field: &str) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "resourceClaims" => "name",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "ports" => "containerPort",
        "hostAliases" => "ip",
        "conditions" => "type",
        "topologySpreadConstraints" => "topologyKey",
        "ownerReferences" => "uid",
        _ => return None,
    })
}

/// Strategic merge patch: like a merge patch, except lists with a merge key merge
/// element-wise, `finalizers` merges as a set, and the `$patch`,
/// `$deleteFromPrimitiveList/…`, `$setElementOrder/…`, `$retainKeys` directives are
/// honoured (the last two by being ignored, which only affects ordering/pruning).
pub(super) fn strategic_merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if p.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut replacement = p.clone();
        replacement.remove("$patch");
        *target = json!({});
        strategic_merge(target, &Value::Object(replacement));
        return;
    }
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().unwrap();
    for (k, v) in p {
        if k == "$patch" || k == "$retainKeys" || k.starts_with("$setElementOrder/") {
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Some(remove)) = (t.get_mut(field), v.as_array()) {
                list.retain(|x| !remove.contains(x));
            }
            continue;
        }
        if v.is_null() || v.get("$patch").and_then(Value::as_str) == Some("delete") {
            t.remove(k);
            continue;
        }
        match v {
            Value::Array(items) => {
                let slot = t.entry(k.clone()).or_insert(json!([]));
                if !slot.is_array() {
                    *slot = json!([]);
                }
                merge_list(k, slot.as_array_mut().unwrap(), items);
            }
            Value::Object(_) => strategic_merge(t.entry(k.clone()).or_insert(Value::Null), v),
            _ => {
                t.insert(k.clone(), v.clone());
            }
        }
    }
}

pub(super) fn merge_list(field: &str, existing: &mut Vec<Value>, items: &[Value]) {
    let is_replace = |x: &Value| x.get("$patch").and_then(Value::as_str) == Some("replace");
    if items.iter().any(is_replace) {
        existing.clear();
        for item in items.iter().filter(|x| !is_replace(x)) {
            let mut fresh = Value::Null;
            strategic_merge(&mut fresh, item);
            existing.push(fresh);
        }
        return;
    }
    match merge_key(field) {
        Some(merge_key) if items.iter().all(Value::is_object) => {
            for item in items {
                let id = item.get(merge_key);
                let position = existing
                    .iter()
                    .position(|e| id.is_some() && e.get(merge_key) == id);
                if item.get("$patch").and_then(Value::as_str) == Some("delete") {
                    existing.retain(|e| id.is_none() || e.get(merge_key) != id);
                    continue;
                }
                match position {
                    Some(i) => strategic_merge(&mut existing[i], item),
                    None => {
                        let mut fresh = Value::Null;
                        strategic_merge(&mut fresh, item);
                        existing.push(fresh);
                    }
                }
            }
        }
        None if field == "finalizers" => {
            for item in items {
                if !existing.contains(item) {
                    existing.push(item.clone());
                }
            }
        }
        _ => *existing = items.to_vec(),
    }
}
