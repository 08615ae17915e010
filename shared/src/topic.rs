//! MQTT topic names, filters and namespaces (filled in by the topic work).
