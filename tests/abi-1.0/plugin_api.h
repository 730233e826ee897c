/*
 * FROZEN: this file is a copy of plugin-api/include/plugin_api.h as it was for plugin ABI 1.0
 * (before ABI 1.1 appended call_host, emit and free_host_buffer to PluginHostContext). Do not
 * edit it: tests/build.rs compiles tests/abi-1.0/echo.c against tests/abi-1.0/plugin_api.h
 * only (C_ECHO_ABI10_LIBRARY), and tests/tests/abi_compat.rs loads the result to prove that
 * hosts built for newer minors still load and run a library built for ABI 1.0.
 */
/*
 * plugin_api.h: the plugin-host plugin ABI for C, C++ and Zig authors.
 *
 * Mirrors plugin-api/src/abi.rs field for field; docs/abi.md explains the contract.
 * A plugin library exports one symbol, `plugin_api_entry`, returning a pointer to a
 * PluginDescriptor that stays valid as long as the library is loaded (hosts never unload).
 * Inputs, outputs and the configuration are MessagePack bytes; names are UTF-8.
 */
#ifndef PLUGIN_API_H
#define PLUGIN_API_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PLUGIN_API_ABI_MAJOR 1
#define PLUGIN_API_ABI_MINOR 0
#define PLUGIN_API_ENTRY_SYMBOL "plugin_api_entry"

/* Status codes returned by create() and call(). */
#define PLUGIN_OK 0             /* output holds the MessagePack result */
#define PLUGIN_ERROR 1          /* output holds a UTF-8 error message */
#define PLUGIN_PANIC 2          /* the plugin crashed in a recoverable way; output: message */
#define PLUGIN_UNKNOWN_METHOD 3 /* no such method; output: message (may be empty) */
#define PLUGIN_BAD_INPUT 4      /* input could not be decoded; output: message */
#define PLUGIN_BAD_OUTPUT 5     /* output could not be encoded; output: message */

/* Log levels for PluginHostContext.log. */
#define PLUGIN_LOG_ERROR 1
#define PLUGIN_LOG_WARN 2
#define PLUGIN_LOG_INFO 3
#define PLUGIN_LOG_DEBUG 4
#define PLUGIN_LOG_TRACE 5

/* A borrowed UTF-8 string or byte slice (not NUL-terminated). */
typedef struct PluginStr {
    const uint8_t *ptr;
    size_t len;
} PluginStr;

/* A buffer the plugin allocates and the host returns through free_buffer(). `cap` is
 * for the plugin's own use (for example the allocation size); the host never reads it. */
typedef struct PluginBuffer {
    uint8_t *ptr;
    size_t len;
    size_t cap;
} PluginBuffer;

/* Services the host offers: valid for the duration of one create() or call(). */
typedef struct PluginHostContext {
    void *data;
    void (*log)(void *data, uint32_t level, const uint8_t *msg, size_t len);
    void (*progress)(void *data, double fraction, const uint8_t *msg, size_t len);
    int32_t (*is_cancelled)(void *data);
} PluginHostContext;

typedef struct PluginDescriptor {
    /* Always first, in every ABI version: the loader checks these before anything else. */
    uint16_t abi_major;
    uint16_t abi_minor;
    const char *name;    /* NUL-terminated UTF-8 */
    const char *version; /* NUL-terminated semver */
    const PluginStr *methods;
    size_t method_count;
    int32_t (*create)(const PluginHostContext *host, const uint8_t *config, size_t config_len,
                      void **instance, PluginBuffer *error);
    /* May be called from several threads at once on one instance. */
    int32_t (*call)(void *instance, const uint8_t *method, size_t method_len,
                    const uint8_t *input, size_t input_len, const PluginHostContext *host,
                    PluginBuffer *output);
    void (*free_buffer)(PluginBuffer buffer);
    /* May never be called: a worker process simply ends; an in-process host calls it when
     * the last handle to the plugin is gone. Do not rely on it to persist anything. */
    void (*destroy)(void *instance);
} PluginDescriptor;

/* Every plugin defines this function. */
const PluginDescriptor *plugin_api_entry(void);

#ifdef __cplusplus
}
#endif

#endif /* PLUGIN_API_H */
