/*
 * A fake libnvidia-ml.so.1 for tests and the simulated node.
 *
 * It exports the C symbols that nvidia-ml-py (module pynvml) resolves for the calls the agent
 * makes, with the same signatures and struct layouts as NVML's nvml.h, so the real ctypes
 * bindings run unchanged against it. Its GPUs, MIG devices, processes, Xid events and faults come
 * from a scenario file named by $FAKE_NVML_SCENARIO, which is re-read whenever it changes (write it
 * with rename() so a reader never sees half a file). One line per object, tab-separated
 * key=value fields:
 *
 *   driver  init=<rc>  version=<string>  countblock=<milliseconds> (nvmlDeviceGetCount hangs: a wedged driver)
 *           recoveryfield=0|1 (the driver offers NVML_FI_DEV_GET_GPU_RECOVERY_ACTION: newer drivers)
 *           instanttimeout=0|1 (nvmlEventSetWait returns TIMEOUT at once when no event is pending: a broken driver)
 *   gpu     uuid= name= minor= util= memutil= total= used= reserved= temp= power= mig=0|1
 *           smclock= memclock= (MHz)  energy= (mJ)  plimit= (mW)  enc= dec= (%)  pcietx= pcierx= (KB/s)
 *           energyrate= (mW: the energy counter grows at this rate from energysince=, Unix seconds)
 *           energyuntil= (Unix seconds: the counter stops growing then; 0, it never stops)
 *           replay=  ecccorr= eccunc=  remapcorr= remapunc= remappending=0|1 remapfailed=0|1
 *           reasons=<clocks event reasons bitmask>  gpm=0|1  smactive= smocc= tensor= dram= (GPM, %)
 *           lost=0|1  unsupported=<call>,<call>  fail=<call>:<rc>,...  block=<call>:<milliseconds>
 *           recovery=<nvmlDeviceGpuRecoveryAction_t> (the field's value where the driver offers it)
 *           pcibus=<bus id, "00000000:18:00.0"> (nvmlDeviceGetPciInfo_v3; MIG devices answer their GPU's)
 *           memtemp=<C> (NVML_FI_DEV_MEMORY_TEMP; -1: no HBM, the field answers NOT_SUPPORTED)
 *   mig     parent=<gpu index> uuid= name= gi= ci= total= used= smactive= smocc= tensor= dram=
 *   proc    gpu=<gpu index> pid= mem=<bytes|na> sm=<percent> gi= ci=
 *   xid     gpu=<gpu index> code=<xid> gi= ci= seq=<n>   (an event; seq numbers grow, each is delivered once)
 *
 * fakeNvmlCallCount(call name) (not an NVML symbol) tells tests how often a call was made.
 * Text values (uuid, name) may hold %XX escapes for bytes that are no UTF-8 (e.g. name=A%FFB).
 * Call names for unsupported/fail/block: name uuid minor util mem memv2 temp tempv power procs
 * procutil mig clock energy plimit enc dec pcie replay ecc remap reasons gpm events fields (the field
 * values) pci, and eventwait (counted only: each nvmlEventSetWait_v2).
 * A symbol is dropped (an older driver) by building the library with a linker version script that
 * makes it local: see sim/fakelib.py.
 */
#include <errno.h>
#include <libgen.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define NVML_SUCCESS 0
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_NOT_SUPPORTED 3
#define NVML_ERROR_NOT_FOUND 6
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_TIMEOUT 10
#define NVML_ERROR_GPU_IS_LOST 15
#define NVML_ERROR_ARGUMENT_VERSION_MISMATCH 25
#define NVML_ERROR_UNKNOWN 999

#define MAX_GPUS 64
#define MAX_MIGS_PER_GPU 7
#define MAX_PROCS 4096
#define MAX_CALLS 32
#define MAX_XIDS 4096
#define MAX_EVENT_SETS 16
#define XID_CRITICAL_ERROR 0x8ULL
#define NO_INSTANCE 0xFFFFFFFFu

typedef struct {
    unsigned int gpu;
    unsigned int memory;
} nvmlUtilization_t;

typedef struct {
    unsigned long long total, free, used;
} nvmlMemory_t;

typedef struct {
    unsigned int version;
    unsigned long long total, reserved, free, used;
} nvmlMemory_v2_t;

typedef struct {
    unsigned int version;
    int sensorType;
    int temperature;
} nvmlTemperature_v1_t;

typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlProcessInfo_t;

typedef struct {
    unsigned int pid;
    unsigned long long timeStamp;
    unsigned int smUtil, memUtil, encUtil, decUtil;
} nvmlProcessUtilizationSample_t;

static const char *CALLS[MAX_CALLS] = {"name",   "uuid",   "minor", "util", "mem",    "memv2",   "temp",
                                       "tempv",  "power",  "procs", "procutil", "mig", "clock", "energy",
                                       "plimit", "enc",    "dec",   "pcie", "replay", "ecc",   "remap",
                                       "reasons", "gpm",   "events", "fields", "eventwait", "pci"};
enum { C_NAME, C_UUID, C_MINOR, C_UTIL, C_MEM, C_MEMV2, C_TEMP, C_TEMPV, C_POWER, C_PROCS,
       C_PROCUTIL, C_MIG, C_CLOCK, C_ENERGY, C_PLIMIT, C_ENC, C_DEC, C_PCIE, C_REPLAY, C_ECC, C_REMAP,
       C_REASONS, C_GPM, C_EVENTS, C_FIELDS, C_EVENTWAIT, C_PCI };

typedef struct {
    unsigned int version;
    unsigned int isSupportedDevice;
} nvmlGpmSupport_t;

typedef struct {
    const char *shortName, *longName, *unit;
} nvmlGpmMetricInfo_t;

typedef struct {
    unsigned int metricId;
    int nvmlReturn;
    double value;
    nvmlGpmMetricInfo_t metricInfo;
} nvmlGpmMetric_t;

/* An opaque sample: what the device reported when it was taken. */
typedef struct {
    int taken, is_mig;
    const void *device;
    unsigned gi;
    unsigned long long at_us;
    double sm_active, sm_occupancy, tensor, dram;
} gpm_sample;

/* metrics[] is as long as the caller's NVML_GPM_METRIC_MAX; only numMetrics entries are touched. */
typedef struct {
    unsigned int version;
    unsigned int numMetrics;
    gpm_sample *sample1, *sample2;
    nvmlGpmMetric_t metrics[];
} nvmlGpmMetricsGet_t;

typedef struct {
    void *device;
    unsigned long long eventType, eventData;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlEventData_t;

struct device {
    int present, is_mig, parent, index;
    char uuid[96], name[96], busid[32];
    unsigned minor, util, memutil, gi, ci, mig_enabled;
    unsigned long long total, used, reserved;
    int temp;
    unsigned power;
    unsigned smclock, memclock, plimit, enc, dec, pcietx, pcierx, replay;
    unsigned remapcorr, remapunc, remappending, remapfailed, gpm, recovery;
    int memtemp; /* -1: no HBM, the field is not supported */
    unsigned long long energy, energyrate, ecccorr, eccunc, reasons;
    double energysince, energyuntil;
    double smactive, smocc, tensor, dram;
    int lost;
    int fail_rc[MAX_CALLS];     /* 0: no injected failure */
    unsigned block_ms[MAX_CALLS]; /* milliseconds to block in that call */
};

struct proc {
    unsigned gpu, pid, sm, gi, ci;
    unsigned long long mem;
};

struct xid {
    unsigned gpu, code, gi, ci;
    unsigned long long seq;
};

/* An event set: the event types registered per GPU, and the last event delivered. */
struct event_set {
    int used;
    unsigned long long types[MAX_GPUS];
    unsigned long long delivered;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct device gpus[MAX_GPUS];
static struct device migs[MAX_GPUS][MAX_MIGS_PER_GPU];
static struct proc procs[MAX_PROCS];
static struct xid xids[MAX_XIDS];
static struct event_set event_sets[MAX_EVENT_SETS];
static unsigned gpu_count, proc_count, xid_count;
static int init_rc;
static unsigned count_block_ms;
static int recovery_field, instant_timeout;
static char driver_version[80] = "fake";
static int initialised;
static struct stat loaded;
static unsigned long long call_counts[MAX_CALLS];

static int call_id(const char *name) {
    for (int i = 0; i < MAX_CALLS && CALLS[i]; i++)
        if (strcmp(CALLS[i], name) == 0) return i;
    return -1;
}

/* Parses "call:value,call:value" (or "call,call" with a default value) into per-call slots. */
static void parse_call_list(char *value, int *out_int, unsigned *out_uint, int dflt) {
    for (char *save = NULL, *tok = strtok_r(value, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        char *colon = strchr(tok, ':');
        long v = dflt;
        if (colon) {
            *colon = '\0';
            v = strtol(colon + 1, NULL, 10);
        }
        int id = call_id(tok);
        if (id < 0) continue;
        if (out_int) out_int[id] = (int)v;
        if (out_uint) out_uint[id] = (unsigned)v;
    }
}

/* Copies a text value, turning %XX escapes into the bytes they name. */
static void unescape(char *out, size_t size, const char *in) {
    size_t n = 0;
    while (*in && n + 1 < size) {
        unsigned byte;
        if (in[0] == '%' && sscanf(in + 1, "%2x", &byte) == 1 && in[1] && in[2]) {
            out[n++] = (char)byte;
            in += 3;
        } else {
            out[n++] = *in++;
        }
    }
    out[n] = '\0';
}

static void parse_device(struct device *d, char *fields) {
    memset(d, 0, sizeof *d);
    d->present = 1;
    d->gi = d->ci = NO_INSTANCE;
    d->memtemp = -1;
    for (char *save = NULL, *kv = strtok_r(fields, "\t\n", &save); kv; kv = strtok_r(NULL, "\t\n", &save)) {
        char *eq = strchr(kv, '=');
        if (!eq) continue;
        *eq = '\0';
        char *k = kv, *v = eq + 1;
        if (!strcmp(k, "uuid")) unescape(d->uuid, sizeof d->uuid, v);
        else if (!strcmp(k, "name")) unescape(d->name, sizeof d->name, v);
        else if (!strcmp(k, "pcibus")) snprintf(d->busid, sizeof d->busid, "%s", v);
        else if (!strcmp(k, "minor")) d->minor = strtoul(v, NULL, 10);
        else if (!strcmp(k, "util")) d->util = strtoul(v, NULL, 10);
        else if (!strcmp(k, "memutil")) d->memutil = strtoul(v, NULL, 10);
        else if (!strcmp(k, "total")) d->total = strtoull(v, NULL, 10);
        else if (!strcmp(k, "used")) d->used = strtoull(v, NULL, 10);
        else if (!strcmp(k, "reserved")) d->reserved = strtoull(v, NULL, 10);
        else if (!strcmp(k, "temp")) d->temp = (int)strtol(v, NULL, 10);
        else if (!strcmp(k, "power")) d->power = strtoul(v, NULL, 10);
        else if (!strcmp(k, "mig")) d->mig_enabled = strtoul(v, NULL, 10);
        else if (!strcmp(k, "smclock")) d->smclock = strtoul(v, NULL, 10);
        else if (!strcmp(k, "memclock")) d->memclock = strtoul(v, NULL, 10);
        else if (!strcmp(k, "energy")) d->energy = strtoull(v, NULL, 10);
        else if (!strcmp(k, "energyrate")) d->energyrate = strtoull(v, NULL, 10);
        else if (!strcmp(k, "energysince")) d->energysince = strtod(v, NULL);
        else if (!strcmp(k, "energyuntil")) d->energyuntil = strtod(v, NULL);
        else if (!strcmp(k, "plimit")) d->plimit = strtoul(v, NULL, 10);
        else if (!strcmp(k, "enc")) d->enc = strtoul(v, NULL, 10);
        else if (!strcmp(k, "dec")) d->dec = strtoul(v, NULL, 10);
        else if (!strcmp(k, "pcietx")) d->pcietx = strtoul(v, NULL, 10);
        else if (!strcmp(k, "pcierx")) d->pcierx = strtoul(v, NULL, 10);
        else if (!strcmp(k, "replay")) d->replay = strtoul(v, NULL, 10);
        else if (!strcmp(k, "ecccorr")) d->ecccorr = strtoull(v, NULL, 10);
        else if (!strcmp(k, "eccunc")) d->eccunc = strtoull(v, NULL, 10);
        else if (!strcmp(k, "remapcorr")) d->remapcorr = strtoul(v, NULL, 10);
        else if (!strcmp(k, "remapunc")) d->remapunc = strtoul(v, NULL, 10);
        else if (!strcmp(k, "remappending")) d->remappending = strtoul(v, NULL, 10);
        else if (!strcmp(k, "remapfailed")) d->remapfailed = strtoul(v, NULL, 10);
        else if (!strcmp(k, "reasons")) d->reasons = strtoull(v, NULL, 0);
        else if (!strcmp(k, "gpm")) d->gpm = strtoul(v, NULL, 10);
        else if (!strcmp(k, "recovery")) d->recovery = strtoul(v, NULL, 10);
        else if (!strcmp(k, "memtemp")) d->memtemp = (int)strtol(v, NULL, 10);
        else if (!strcmp(k, "smactive")) d->smactive = strtod(v, NULL);
        else if (!strcmp(k, "smocc")) d->smocc = strtod(v, NULL);
        else if (!strcmp(k, "tensor")) d->tensor = strtod(v, NULL);
        else if (!strcmp(k, "dram")) d->dram = strtod(v, NULL);
        else if (!strcmp(k, "lost")) d->lost = (int)strtol(v, NULL, 10);
        else if (!strcmp(k, "parent")) d->parent = (int)strtol(v, NULL, 10);
        else if (!strcmp(k, "gi")) d->gi = strtoul(v, NULL, 10);
        else if (!strcmp(k, "ci")) d->ci = strtoul(v, NULL, 10);
        else if (!strcmp(k, "unsupported")) parse_call_list(v, d->fail_rc, NULL, NVML_ERROR_NOT_SUPPORTED);
        else if (!strcmp(k, "fail")) parse_call_list(v, d->fail_rc, NULL, NVML_ERROR_UNKNOWN);
        else if (!strcmp(k, "block")) parse_call_list(v, NULL, d->block_ms, 0);
    }
}

static void parse_proc(struct proc *p, char *fields) {
    memset(p, 0, sizeof *p);
    p->gi = p->ci = NO_INSTANCE;
    for (char *save = NULL, *kv = strtok_r(fields, "\t\n", &save); kv; kv = strtok_r(NULL, "\t\n", &save)) {
        char *eq = strchr(kv, '=');
        if (!eq) continue;
        *eq = '\0';
        char *k = kv, *v = eq + 1;
        if (!strcmp(k, "gpu")) p->gpu = strtoul(v, NULL, 10);
        else if (!strcmp(k, "pid")) p->pid = strtoul(v, NULL, 10);
        else if (!strcmp(k, "sm")) p->sm = strtoul(v, NULL, 10);
        else if (!strcmp(k, "gi")) p->gi = strtoul(v, NULL, 10);
        else if (!strcmp(k, "ci")) p->ci = strtoul(v, NULL, 10);
        else if (!strcmp(k, "mem")) p->mem = strcmp(v, "na") ? strtoull(v, NULL, 10) : ULLONG_MAX;
    }
}

static void parse_xid(struct xid *x, char *fields) {
    memset(x, 0, sizeof *x);
    x->gi = x->ci = NO_INSTANCE;
    for (char *save = NULL, *kv = strtok_r(fields, "\t\n", &save); kv; kv = strtok_r(NULL, "\t\n", &save)) {
        char *eq = strchr(kv, '=');
        if (!eq) continue;
        *eq = '\0';
        char *k = kv, *v = eq + 1;
        if (!strcmp(k, "gpu")) x->gpu = strtoul(v, NULL, 10);
        else if (!strcmp(k, "code")) x->code = strtoul(v, NULL, 10);
        else if (!strcmp(k, "gi")) x->gi = strtoul(v, NULL, 10);
        else if (!strcmp(k, "ci")) x->ci = strtoul(v, NULL, 10);
        else if (!strcmp(k, "seq")) x->seq = strtoull(v, NULL, 10);
    }
}

/* Re-reads the scenario if the file changed since the last read. Caller holds the lock. */
static void reload_locked(void) {
    const char *path = getenv("FAKE_NVML_SCENARIO");
    struct stat st;
    if (!path || stat(path, &st) != 0) return;
    if (st.st_ino == loaded.st_ino && st.st_size == loaded.st_size &&
        st.st_mtim.tv_sec == loaded.st_mtim.tv_sec && st.st_mtim.tv_nsec == loaded.st_mtim.tv_nsec)
        return;
    FILE *f = fopen(path, "r");
    if (!f) return;
    loaded = st;
    /* Slots keep their addresses (handles stay valid); a GPU gone from the file reads as lost. */
    for (unsigned i = 0; i < MAX_GPUS; i++) {
        gpus[i].present = 0;
        for (unsigned j = 0; j < MAX_MIGS_PER_GPU; j++) migs[i][j].present = 0;
    }
    unsigned mig_fill[MAX_GPUS] = {0};
    gpu_count = proc_count = xid_count = 0;
    init_rc = NVML_SUCCESS;
    count_block_ms = 0;
    recovery_field = instant_timeout = 0;
    char line[4096];
    while (fgets(line, sizeof line, f)) {
        char *tab = strchr(line, '\t');
        if (!tab) continue;
        *tab = '\0';
        char *rest = tab + 1;
        if (!strcmp(line, "driver")) {
            char copy[4096];
            snprintf(copy, sizeof copy, "%s", rest);
            for (char *save = NULL, *kv = strtok_r(copy, "\t\n", &save); kv; kv = strtok_r(NULL, "\t\n", &save)) {
                if (!strncmp(kv, "init=", 5)) init_rc = (int)strtol(kv + 5, NULL, 10);
                else if (!strncmp(kv, "version=", 8)) snprintf(driver_version, sizeof driver_version, "%s", kv + 8);
                else if (!strncmp(kv, "countblock=", 11)) count_block_ms = (unsigned)strtoul(kv + 11, NULL, 10);
                else if (!strncmp(kv, "recoveryfield=", 14)) recovery_field = (int)strtol(kv + 14, NULL, 10);
                else if (!strncmp(kv, "instanttimeout=", 15)) instant_timeout = (int)strtol(kv + 15, NULL, 10);
            }
        } else if (!strcmp(line, "gpu") && gpu_count < MAX_GPUS) {
            parse_device(&gpus[gpu_count], rest);
            gpus[gpu_count].index = (int)gpu_count;
            gpu_count++;
        } else if (!strcmp(line, "mig")) {
            struct device d;
            parse_device(&d, rest);
            if (d.parent >= 0 && d.parent < MAX_GPUS && mig_fill[d.parent] < MAX_MIGS_PER_GPU) {
                d.is_mig = 1;
                d.index = (int)mig_fill[d.parent];
                migs[d.parent][mig_fill[d.parent]++] = d;
            }
        } else if (!strcmp(line, "proc") && proc_count < MAX_PROCS) {
            parse_proc(&procs[proc_count++], rest);
        } else if (!strcmp(line, "xid") && xid_count < MAX_XIDS) {
            parse_xid(&xids[xid_count++], rest);
        }
    }
    fclose(f);
}

/* Looks up a handle and an injected fault for one call; copies the device out under the lock. */
static int enter(const void *handle, int call, struct device *out) {
    pthread_mutex_lock(&lock);
    reload_locked();
    if (!initialised) {
        pthread_mutex_unlock(&lock);
        return NVML_ERROR_UNINITIALIZED;
    }
    const struct device *d = handle;
    if (!d) {
        pthread_mutex_unlock(&lock);
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    *out = *d;
    if (call >= 0) call_counts[call]++;
    int lost = !d->present || d->lost || (d->is_mig && (gpus[d->parent].lost || !gpus[d->parent].present));
    pthread_mutex_unlock(&lock);
    if (lost) return NVML_ERROR_GPU_IS_LOST;
    if (call >= 0 && out->block_ms[call]) {
        struct timespec pause = {out->block_ms[call] / 1000, (long)(out->block_ms[call] % 1000) * 1000000L};
        while (nanosleep(&pause, &pause) != 0) {
        }
    }
    if (call >= 0 && out->fail_rc[call]) return out->fail_rc[call];
    return NVML_SUCCESS;
}

/* Not NVML: how many times a call (by its scenario name) was made, for tests to see what was retried. */
unsigned long long fakeNvmlCallCount(const char *name) {
    int id = call_id(name);
    pthread_mutex_lock(&lock);
    unsigned long long n = id < 0 ? 0 : call_counts[id];
    pthread_mutex_unlock(&lock);
    return n;
}

int nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    pthread_mutex_lock(&lock);
    reload_locked();
    int rc = init_rc;
    if (rc == NVML_SUCCESS) initialised = 1;
    pthread_mutex_unlock(&lock);
    return rc;
}

int nvmlInit_v2(void) { return nvmlInitWithFlags(0); }

int nvmlShutdown(void) {
    pthread_mutex_lock(&lock);
    initialised = 0;
    pthread_mutex_unlock(&lock);
    return NVML_SUCCESS;
}

const char *nvmlErrorString(int rc) {
    switch (rc) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    case NVML_ERROR_TIMEOUT: return "Timeout";
    case 13: return "Function Not Found";
    case 9: return "Driver Not Loaded";
    default: return "Unknown Error";
    }
}

int nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    pthread_mutex_lock(&lock);
    reload_locked();
    int rc = initialised ? NVML_SUCCESS : NVML_ERROR_UNINITIALIZED;
    if (rc == NVML_SUCCESS) snprintf(version, length, "%s", driver_version);
    pthread_mutex_unlock(&lock);
    return rc;
}

int nvmlDeviceGetCount_v2(unsigned int *count) {
    pthread_mutex_lock(&lock);
    reload_locked();
    int rc = initialised ? NVML_SUCCESS : NVML_ERROR_UNINITIALIZED;
    *count = gpu_count;
    unsigned block_ms = count_block_ms;
    pthread_mutex_unlock(&lock);
    if (block_ms) {
        struct timespec pause = {block_ms / 1000, (long)(block_ms % 1000) * 1000000L};
        while (nanosleep(&pause, &pause) != 0) {
        }
    }
    return rc;
}

int nvmlDeviceGetHandleByIndex_v2(unsigned int index, void **device) {
    pthread_mutex_lock(&lock);
    reload_locked();
    int rc = !initialised ? NVML_ERROR_UNINITIALIZED
             : index >= gpu_count ? NVML_ERROR_INVALID_ARGUMENT
             : gpus[index].lost ? NVML_ERROR_GPU_IS_LOST : NVML_SUCCESS;
    if (rc == NVML_SUCCESS) *device = &gpus[index];
    pthread_mutex_unlock(&lock);
    return rc;
}

int nvmlDeviceGetIndex(void *device, unsigned int *index) {
    struct device d;
    int rc = enter(device, -1, &d);
    if (rc == NVML_SUCCESS) *index = (unsigned)d.index;
    return rc;
}

int nvmlDeviceGetMinorNumber(void *device, unsigned int *minor) {
    struct device d;
    int rc = enter(device, C_MINOR, &d);
    if (rc == NVML_SUCCESS) *minor = d.minor;
    return rc;
}

int nvmlDeviceGetName(void *device, char *name, unsigned int length) {
    struct device d;
    int rc = enter(device, C_NAME, &d);
    if (rc == NVML_SUCCESS) snprintf(name, length, "%s", d.name);
    return rc;
}

int nvmlDeviceGetUUID(void *device, char *uuid, unsigned int length) {
    struct device d;
    int rc = enter(device, C_UUID, &d);
    if (rc == NVML_SUCCESS) snprintf(uuid, length, "%s", d.uuid);
    return rc;
}

/* nvml.h's nvmlPciInfo_t as of v3: busId is the 8-digit-domain form, busIdLegacy the 4-digit one. */
typedef struct {
    char busIdLegacy[16];
    unsigned int domain, bus, device, pciDeviceId, pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;

int nvmlDeviceGetPciInfo_v3(void *device, nvmlPciInfo_t *pci) {
    struct device d;
    int rc = enter(device, C_PCI, &d);
    if (rc != NVML_SUCCESS) return rc;
    if (d.is_mig) {
        pthread_mutex_lock(&lock);
        snprintf(d.busid, sizeof d.busid, "%s", gpus[d.parent].busid);
        pthread_mutex_unlock(&lock);
    }
    memset(pci, 0, sizeof *pci);
    if (sscanf(d.busid, "%x:%x:%x", &pci->domain, &pci->bus, &pci->device) != 3) return NVML_ERROR_UNKNOWN;
    snprintf(pci->busId, sizeof pci->busId, "%s", d.busid);
    snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, "%04X:%02X:%02X.0", pci->domain & 0xFFFF, pci->bus,
             pci->device);
    pci->pciDeviceId = 0x233010DE; /* H100 SXM5 */
    return NVML_SUCCESS;
}

int nvmlDeviceGetUtilizationRates(void *device, nvmlUtilization_t *util) {
    struct device d;
    int rc = enter(device, C_UTIL, &d);
    if (rc != NVML_SUCCESS) return rc;
    if (d.is_mig || d.mig_enabled) return NVML_ERROR_NOT_SUPPORTED; /* as on real MIG */
    util->gpu = d.util;
    util->memory = d.memutil;
    return NVML_SUCCESS;
}

int nvmlDeviceGetMemoryInfo(void *device, nvmlMemory_t *mem) {
    struct device d;
    int rc = enter(device, C_MEM, &d);
    if (rc != NVML_SUCCESS) return rc;
    /* v1 counts the driver's reservation as used, as drivers >= 510 do. */
    mem->total = d.total;
    mem->used = d.used + d.reserved;
    mem->free = d.total - mem->used;
    return NVML_SUCCESS;
}

int nvmlDeviceGetMemoryInfo_v2(void *device, nvmlMemory_v2_t *mem) {
    struct device d;
    int rc = enter(device, C_MEMV2, &d);
    if (rc == NVML_SUCCESS && d.fail_rc[C_MEM]) rc = d.fail_rc[C_MEM];
    if (rc != NVML_SUCCESS) return rc;
    if (mem->version != 0x02000028) return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    mem->total = d.total;
    mem->reserved = d.reserved;
    mem->used = d.used;
    mem->free = d.total - d.used - d.reserved;
    return NVML_SUCCESS;
}

int nvmlDeviceGetTemperature(void *device, int sensor, unsigned int *temp) {
    struct device d;
    int rc = enter(device, C_TEMP, &d);
    if (rc != NVML_SUCCESS) return rc;
    if (sensor != 0 || d.is_mig) return NVML_ERROR_NOT_SUPPORTED;
    *temp = (unsigned)d.temp;
    return NVML_SUCCESS;
}

int nvmlDeviceGetTemperatureV(void *device, nvmlTemperature_v1_t *temp) {
    struct device d;
    int rc = enter(device, C_TEMPV, &d);
    if (rc == NVML_SUCCESS && d.fail_rc[C_TEMP]) rc = d.fail_rc[C_TEMP];
    if (rc != NVML_SUCCESS) return rc;
    if (temp->version != 0x100000C) return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    if (temp->sensorType != 0 || d.is_mig) return NVML_ERROR_NOT_SUPPORTED;
    temp->temperature = d.temp;
    return NVML_SUCCESS;
}

int nvmlDeviceGetPowerUsage(void *device, unsigned int *power) {
    struct device d;
    int rc = enter(device, C_POWER, &d);
    if (rc != NVML_SUCCESS) return rc;
    if (d.is_mig) return NVML_ERROR_NOT_SUPPORTED;
    *power = d.power;
    return NVML_SUCCESS;
}

/* Collects the processes of a GPU (all its MIG instances) or of one MIG device. */
static unsigned matching_procs(const struct device *d, struct proc *out, unsigned cap) {
    unsigned n = 0;
    pthread_mutex_lock(&lock);
    for (unsigned i = 0; i < proc_count && n < cap; i++) {
        const struct proc *p = &procs[i];
        int match = d->is_mig ? ((int)p->gpu == d->parent && p->gi == d->gi) : (int)p->gpu == d->index;
        if (match) out[n++] = *p;
    }
    pthread_mutex_unlock(&lock);
    return n;
}

int nvmlDeviceGetComputeRunningProcesses_v3(void *device, unsigned int *count, nvmlProcessInfo_t *infos) {
    struct device d;
    int rc = enter(device, C_PROCS, &d);
    if (rc != NVML_SUCCESS) return rc;
    static __thread struct proc found[MAX_PROCS];
    unsigned n = matching_procs(&d, found, MAX_PROCS);
    if (infos == NULL || *count < n) {
        *count = n;
        return n == 0 ? NVML_SUCCESS : NVML_ERROR_INSUFFICIENT_SIZE;
    }
    for (unsigned i = 0; i < n; i++) {
        infos[i].pid = found[i].pid;
        infos[i].usedGpuMemory = found[i].mem;
        infos[i].gpuInstanceId = found[i].gi;
        infos[i].computeInstanceId = found[i].ci;
    }
    *count = n;
    return NVML_SUCCESS;
}

static unsigned long long now_us(void) {
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (unsigned long long)tv.tv_sec * 1000000ULL + (unsigned long long)tv.tv_usec;
}

/* Only processes with non-zero SM use have samples, as in the driver; none newer is NOT_FOUND. */
int nvmlDeviceGetProcessUtilization(void *device, nvmlProcessUtilizationSample_t *samples,
                                    unsigned int *count, unsigned long long lastSeen) {
    struct device d;
    int rc = enter(device, C_PROCUTIL, &d);
    if (rc != NVML_SUCCESS) return rc;
    if (d.is_mig || d.mig_enabled) return NVML_ERROR_NOT_SUPPORTED;
    static __thread struct proc found[MAX_PROCS];
    unsigned n = matching_procs(&d, found, MAX_PROCS), busy = 0;
    unsigned long long ts = now_us();
    for (unsigned i = 0; i < n; i++)
        if (found[i].sm > 0) found[busy++] = found[i];
    if (busy == 0 || lastSeen >= ts) return NVML_ERROR_NOT_FOUND;
    if (samples == NULL || *count < busy) {
        *count = busy;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    for (unsigned i = 0; i < busy; i++) {
        memset(&samples[i], 0, sizeof samples[i]);
        samples[i].pid = found[i].pid;
        samples[i].timeStamp = ts;
        samples[i].smUtil = found[i].sm;
    }
    *count = busy;
    return NVML_SUCCESS;
}

int nvmlDeviceGetMigMode(void *device, unsigned int *current, unsigned int *pending) {
    struct device d;
    int rc = enter(device, C_MIG, &d);
    if (rc != NVML_SUCCESS) return rc;
    if (d.is_mig) return NVML_ERROR_NOT_SUPPORTED;
    *current = *pending = d.mig_enabled;
    return NVML_SUCCESS;
}

int nvmlDeviceGetMaxMigDeviceCount(void *device, unsigned int *count) {
    struct device d;
    int rc = enter(device, C_MIG, &d);
    if (rc != NVML_SUCCESS) return rc;
    *count = d.mig_enabled ? MAX_MIGS_PER_GPU : 0;
    return NVML_SUCCESS;
}

int nvmlDeviceGetMigDeviceHandleByIndex(void *device, unsigned int index, void **mig) {
    struct device d;
    int rc = enter(device, C_MIG, &d);
    if (rc != NVML_SUCCESS) return rc;
    if (!d.mig_enabled || index >= MAX_MIGS_PER_GPU) return NVML_ERROR_INVALID_ARGUMENT;
    pthread_mutex_lock(&lock);
    struct device *m = &migs[d.index][index];
    rc = m->present ? NVML_SUCCESS : NVML_ERROR_NOT_FOUND;
    if (rc == NVML_SUCCESS) *mig = m;
    pthread_mutex_unlock(&lock);
    return rc;
}

int nvmlDeviceIsMigDeviceHandle(void *device, unsigned int *is_mig) {
    struct device d;
    int rc = enter(device, -1, &d);
    if (rc == NVML_SUCCESS) *is_mig = (unsigned)d.is_mig;
    return rc;
}

int nvmlDeviceGetDeviceHandleFromMigDeviceHandle(void *mig, void **device) {
    struct device d;
    int rc = enter(mig, -1, &d);
    if (rc != NVML_SUCCESS) return rc;
    if (!d.is_mig) return NVML_ERROR_INVALID_ARGUMENT;
    *device = &gpus[d.parent];
    return NVML_SUCCESS;
}

int nvmlDeviceGetGpuInstanceId(void *device, unsigned int *id) {
    struct device d;
    int rc = enter(device, -1, &d);
    if (rc != NVML_SUCCESS) return rc;
    if (!d.is_mig) return NVML_ERROR_INVALID_ARGUMENT;
    *id = d.gi;
    return NVML_SUCCESS;
}

int nvmlDeviceGetComputeInstanceId(void *device, unsigned int *id) {
    struct device d;
    int rc = enter(device, -1, &d);
    if (rc != NVML_SUCCESS) return rc;
    if (!d.is_mig) return NVML_ERROR_INVALID_ARGUMENT;
    *id = d.ci;
    return NVML_SUCCESS;
}

int nvmlDeviceGetClockInfo(void *device, int type, unsigned int *mhz) {
    struct device d;
    int rc = enter(device, C_CLOCK, &d);
    if (rc != NVML_SUCCESS) return rc;
    if (d.is_mig) return NVML_ERROR_NOT_SUPPORTED;
    switch (type) {
    case 0: /* graphics */
    case 1: *mhz = d.smclock; break; /* SM */
    case 2: *mhz = d.memclock; break;
    case 3: *mhz = d.smclock * 9 / 10; break; /* video */
    default: return NVML_ERROR_INVALID_ARGUMENT;
    }
    return NVML_SUCCESS;
}

int nvmlDeviceGetTotalEnergyConsumption(void *device, unsigned long long *millijoules) {
    struct device d;
    int rc = enter(device, C_ENERGY, &d);
    if (rc != NVML_SUCCESS) return rc;
    if (d.is_mig) return NVML_ERROR_NOT_SUPPORTED;
    *millijoules = d.energy;
    double now_s = (double)now_us() / 1e6;
    if (d.energyuntil > 0 && now_s > d.energyuntil) now_s = d.energyuntil;
    double elapsed_s = now_s - d.energysince;
    if (d.energyrate && elapsed_s > 0) *millijoules += (unsigned long long)((double)d.energyrate * elapsed_s);
    return NVML_SUCCESS;
}

int nvmlDeviceGetEnforcedPowerLimit(void *device, unsigned int *milliwatts) {
    struct device d;
    int rc = enter(device, C_PLIMIT, &d);
    if (rc != NVML_SUCCESS) return rc;
    if (d.is_mig) return NVML_ERROR_NOT_SUPPORTED;
    *milliwatts = d.plimit;
    return NVML_SUCCESS;
}

static int codec_utilisation(void *device, int call, unsigned int *util, unsigned int *period_us) {
    struct device d;
    int rc = enter(device, call, &d);
    if (rc != NVML_SUCCESS) return rc;
    if (d.is_mig) return NVML_ERROR_NOT_SUPPORTED;
    *util = call == C_ENC ? d.enc : d.dec;
    *period_us = 167000;
    return NVML_SUCCESS;
}

int nvmlDeviceGetEncoderUtilization(void *device, unsigned int *util, unsigned int *period_us) {
    return codec_utilisation(device, C_ENC, util, period_us);
}

int nvmlDeviceGetDecoderUtilization(void *device, unsigned int *util, unsigned int *period_us) {
    return codec_utilisation(device, C_DEC, util, period_us);
}

/* counter: NVML_PCIE_UTIL_TX_BYTES 0, NVML_PCIE_UTIL_RX_BYTES 1; KB/s over a 20 ms sample. */
int nvmlDeviceGetPcieThroughput(void *device, int counter, unsigned int *kib_per_s) {
    struct device d;
    int rc = enter(device, C_PCIE, &d);
    if (rc != NVML_SUCCESS) return rc;
    if (d.is_mig) return NVML_ERROR_NOT_SUPPORTED;
    if (counter != 0 && counter != 1) return NVML_ERROR_INVALID_ARGUMENT;
    *kib_per_s = counter == 0 ? d.pcietx : d.pcierx;
    return NVML_SUCCESS;
}

int nvmlDeviceGetPcieReplayCounter(void *device, unsigned int *value) {
    struct device d;
    int rc = enter(device, C_REPLAY, &d);
    if (rc != NVML_SUCCESS) return rc;
    if (d.is_mig) return NVML_ERROR_NOT_SUPPORTED;
    *value = d.replay;
    return NVML_SUCCESS;
}

/* errorType: corrected 0, uncorrected 1; counterType: volatile 0, aggregate 1 (here the same counts). */
int nvmlDeviceGetTotalEccErrors(void *device, int error_type, int counter_type, unsigned long long *count) {
    struct device d;
    int rc = enter(device, C_ECC, &d);
    if (rc != NVML_SUCCESS) return rc;
    if (d.is_mig) return NVML_ERROR_NOT_SUPPORTED;
    if ((error_type != 0 && error_type != 1) || (counter_type != 0 && counter_type != 1))
        return NVML_ERROR_INVALID_ARGUMENT;
    *count = error_type == 0 ? d.ecccorr : d.eccunc;
    return NVML_SUCCESS;
}

int nvmlDeviceGetRemappedRows(void *device, unsigned int *corr, unsigned int *unc, unsigned int *pending,
                              unsigned int *failure) {
    struct device d;
    int rc = enter(device, C_REMAP, &d);
    if (rc != NVML_SUCCESS) return rc;
    if (d.is_mig) return NVML_ERROR_NOT_SUPPORTED;
    *corr = d.remapcorr;
    *unc = d.remapunc;
    *pending = d.remappending;
    *failure = d.remapfailed;
    return NVML_SUCCESS;
}

/* The current name, and the name older drivers (< 535) export: one may be dropped from the build. */
int nvmlDeviceGetCurrentClocksEventReasons(void *device, unsigned long long *reasons) {
    struct device d;
    int rc = enter(device, C_REASONS, &d);
    if (rc != NVML_SUCCESS) return rc;
    if (d.is_mig) return NVML_ERROR_NOT_SUPPORTED;
    *reasons = d.reasons;
    return NVML_SUCCESS;
}

int nvmlDeviceGetCurrentClocksThrottleReasons(void *device, unsigned long long *reasons) {
    return nvmlDeviceGetCurrentClocksEventReasons(device, reasons);
}

/* ---- GPM: supported where the scenario says gpm=1 (Hopper and newer); values of the later sample. */

int nvmlGpmQueryDeviceSupport(void *device, nvmlGpmSupport_t *support) {
    struct device d;
    int rc = enter(device, C_GPM, &d);
    if (rc != NVML_SUCCESS) return rc;
    if (support->version != 1) return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    support->isSupportedDevice = d.is_mig ? gpus[d.parent].gpm : d.gpm;
    return NVML_SUCCESS;
}

int nvmlGpmSampleAlloc(gpm_sample **sample) {
    if (!sample) return NVML_ERROR_INVALID_ARGUMENT;
    *sample = calloc(1, sizeof **sample);
    return *sample ? NVML_SUCCESS : NVML_ERROR_UNKNOWN;
}

int nvmlGpmSampleFree(gpm_sample *sample) {
    free(sample);
    return NVML_SUCCESS;
}

static void fill_sample(gpm_sample *s, const struct device *d, const void *handle, unsigned gi, int is_mig) {
    s->taken = 1;
    s->is_mig = is_mig;
    s->device = handle;
    s->gi = gi;
    s->at_us = now_us();
    s->sm_active = d->smactive;
    s->sm_occupancy = d->smocc;
    s->tensor = d->tensor;
    s->dram = d->dram;
}

int nvmlGpmSampleGet(void *device, gpm_sample *sample) {
    struct device d;
    int rc = enter(device, C_GPM, &d);
    if (rc != NVML_SUCCESS) return rc;
    if (!sample) return NVML_ERROR_INVALID_ARGUMENT;
    if (!d.gpm || d.is_mig) return NVML_ERROR_NOT_SUPPORTED;
    fill_sample(sample, &d, device, NO_INSTANCE, 0);
    return NVML_SUCCESS;
}

/* device: the parent GPU's handle; the MIG device is named by its GPU instance id. */
int nvmlGpmMigSampleGet(void *device, unsigned int gpu_instance_id, gpm_sample *sample) {
    struct device d;
    int rc = enter(device, C_GPM, &d);
    if (rc != NVML_SUCCESS) return rc;
    if (!sample || d.is_mig) return NVML_ERROR_INVALID_ARGUMENT;
    if (!d.gpm) return NVML_ERROR_NOT_SUPPORTED;
    pthread_mutex_lock(&lock);
    rc = NVML_ERROR_NOT_FOUND;
    for (unsigned j = 0; j < MAX_MIGS_PER_GPU; j++) {
        const struct device *m = &migs[d.index][j];
        if (m->present && m->gi == gpu_instance_id) {
            fill_sample(sample, m, device, gpu_instance_id, 1);
            rc = NVML_SUCCESS;
            break;
        }
    }
    pthread_mutex_unlock(&lock);
    return rc;
}

int nvmlGpmMetricsGet(nvmlGpmMetricsGet_t *request) {
    if (!request) return NVML_ERROR_INVALID_ARGUMENT;
    if (request->version != 1) return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    const gpm_sample *a = request->sample1, *b = request->sample2;
    /* Two samples of the same device, the second taken later. */
    if (!a || !b || !a->taken || !b->taken || a->device != b->device || a->gi != b->gi || b->at_us <= a->at_us)
        return NVML_ERROR_INVALID_ARGUMENT;
    for (unsigned i = 0; i < request->numMetrics; i++) {
        nvmlGpmMetric_t *m = &request->metrics[i];
        m->nvmlReturn = NVML_SUCCESS;
        memset(&m->metricInfo, 0, sizeof m->metricInfo);
        switch (m->metricId) {
        case 2: m->value = b->sm_active; break;    /* NVML_GPM_METRIC_SM_UTIL */
        case 3: m->value = b->sm_occupancy; break; /* NVML_GPM_METRIC_SM_OCCUPANCY */
        case 5: m->value = b->tensor; break;       /* NVML_GPM_METRIC_ANY_TENSOR_UTIL */
        case 10: m->value = b->dram; break;        /* NVML_GPM_METRIC_DRAM_BW_UTIL */
        default: m->value = 0; m->nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
        }
    }
    return NVML_SUCCESS;
}

/* ---- Events: Xid critical errors from the scenario's xid lines, each delivered once per event set. */

int nvmlEventSetCreate(struct event_set **set) {
    if (!set) return NVML_ERROR_INVALID_ARGUMENT;
    pthread_mutex_lock(&lock);
    reload_locked();
    int rc = initialised ? NVML_ERROR_UNKNOWN : NVML_ERROR_UNINITIALIZED;
    for (unsigned i = 0; initialised && i < MAX_EVENT_SETS; i++) {
        if (!event_sets[i].used) {
            memset(&event_sets[i], 0, sizeof event_sets[i]);
            event_sets[i].used = 1;
            /* Only events that happen from now on: the highest sequence number seen so far. */
            for (unsigned j = 0; j < xid_count; j++)
                if (xids[j].seq > event_sets[i].delivered) event_sets[i].delivered = xids[j].seq;
            *set = &event_sets[i];
            rc = NVML_SUCCESS;
            break;
        }
    }
    pthread_mutex_unlock(&lock);
    return rc;
}

int nvmlEventSetFree(struct event_set *set) {
    if (!set) return NVML_ERROR_INVALID_ARGUMENT;
    pthread_mutex_lock(&lock);
    set->used = 0;
    pthread_mutex_unlock(&lock);
    return NVML_SUCCESS;
}

int nvmlDeviceRegisterEvents(void *device, unsigned long long types, struct event_set *set) {
    struct device d;
    int rc = enter(device, C_EVENTS, &d);
    if (rc != NVML_SUCCESS) return rc;
    if (!set || !set->used) return NVML_ERROR_INVALID_ARGUMENT;
    if (d.is_mig || (types & ~XID_CRITICAL_ERROR)) return NVML_ERROR_NOT_SUPPORTED;
    pthread_mutex_lock(&lock);
    set->types[d.index] |= types;
    pthread_mutex_unlock(&lock);
    return NVML_SUCCESS;
}

/* Blocks until the scenario's directory changes (a scenario written by rename) or timeout_us pass,
 * as the driver's wait blocks in the kernel rather than spinning. */
static void wait_for_scenario_change(unsigned long long timeout_us) {
    const char *path = getenv("FAKE_NVML_SCENARIO");
    char directory[PATH_MAX];
    int fd = inotify_init1(IN_CLOEXEC);
    if (path && fd >= 0) {
        snprintf(directory, sizeof directory, "%s", path);
        if (inotify_add_watch(fd, dirname(directory), IN_MOVED_TO | IN_CLOSE_WRITE) >= 0) {
            struct pollfd ready = {fd, POLLIN, 0};
            poll(&ready, 1, (int)((timeout_us + 999) / 1000));
        }
    } else {
        struct timespec step = {0, 20 * 1000 * 1000};
        nanosleep(&step, NULL);
    }
    if (fd >= 0) close(fd);
}

/* The oldest undelivered event on a registered GPU, waiting up to timeout_ms; TIMEOUT when none. */
int nvmlEventSetWait_v2(struct event_set *set, nvmlEventData_t *data, unsigned int timeout_ms) {
    if (!set || !data) return NVML_ERROR_INVALID_ARGUMENT;
    unsigned long long deadline = now_us() + (unsigned long long)timeout_ms * 1000ULL;
    pthread_mutex_lock(&lock);
    call_counts[C_EVENTWAIT]++;
    pthread_mutex_unlock(&lock);
    for (;;) {
        pthread_mutex_lock(&lock);
        reload_locked();
        if (!initialised || !set->used) {
            pthread_mutex_unlock(&lock);
            return initialised ? NVML_ERROR_INVALID_ARGUMENT : NVML_ERROR_UNINITIALIZED;
        }
        const struct xid *next = NULL;
        for (unsigned i = 0; i < xid_count; i++) {
            const struct xid *x = &xids[i];
            if (x->seq > set->delivered && x->gpu < MAX_GPUS && (set->types[x->gpu] & XID_CRITICAL_ERROR) &&
                (!next || x->seq < next->seq))
                next = x;
        }
        if (next) {
            set->delivered = next->seq;
            data->device = &gpus[next->gpu];
            data->eventType = XID_CRITICAL_ERROR;
            data->eventData = next->code;
            data->gpuInstanceId = next->gi;
            data->computeInstanceId = next->ci;
            pthread_mutex_unlock(&lock);
            return NVML_SUCCESS;
        }
        int at_once = instant_timeout;
        pthread_mutex_unlock(&lock);
        unsigned long long now = now_us();
        if (now >= deadline || at_once) return NVML_ERROR_TIMEOUT;
        wait_for_scenario_change(deadline - now);
    }
}

/*
 * Calls the agent does not make but peer exporters do (the benchmark runs nvitop-exporter on the
 * same scenario): fixed, plausible answers of a datacenter GPU, so the peer pays for each call as it
 * would on a real node instead of skipping a missing symbol.
 */
int nvmlSystemGetCudaDriverVersion(int *version) {
    *version = 12040;
    return NVML_SUCCESS;
}

int nvmlSystemGetCudaDriverVersion_v2(int *version) { return nvmlSystemGetCudaDriverVersion(version); }

int nvmlDeviceGetFanSpeed(void *device, unsigned int *speed) {
    struct device d;
    int rc = enter(device, -1, &d);
    (void)speed;
    return rc == NVML_SUCCESS ? NVML_ERROR_NOT_SUPPORTED : rc; /* passively cooled */
}

/* ---- Field values: the GPU recovery action, on a driver that offers it, and the memory (HBM)
 * temperature, on a GPU that has it; other fields are not supported, each in its own entry as NVML
 * reports them. */

#define NVML_FI_DEV_MEMORY_TEMP 82
#define NVML_FI_DEV_GET_GPU_RECOVERY_ACTION 230
#define NVML_VALUE_TYPE_UNSIGNED_INT 1

typedef struct {
    unsigned int fieldId, scopeId;
    long long timestamp, latencyUsec;
    int valueType, nvmlReturn;
    union {
        double dVal;
        unsigned int uiVal;
        unsigned long long ullVal;
    } value;
} nvmlFieldValue_t;

int nvmlDeviceGetFieldValues(void *device, int count, nvmlFieldValue_t *values) {
    struct device d;
    int rc = enter(device, C_FIELDS, &d);
    if (rc != NVML_SUCCESS) return rc;
    if (!values || count < 0) return NVML_ERROR_INVALID_ARGUMENT;
    pthread_mutex_lock(&lock);
    int offered = recovery_field;
    pthread_mutex_unlock(&lock);
    for (int i = 0; i < count; i++) {
        nvmlFieldValue_t *v = &values[i];
        v->timestamp = (long long)now_us();
        v->latencyUsec = 0;
        if (v->fieldId == NVML_FI_DEV_GET_GPU_RECOVERY_ACTION && offered && !d.is_mig) {
            v->valueType = NVML_VALUE_TYPE_UNSIGNED_INT;
            v->nvmlReturn = NVML_SUCCESS;
            v->value.ullVal = 0;
            v->value.uiVal = d.recovery;
        } else if (v->fieldId == NVML_FI_DEV_MEMORY_TEMP && d.memtemp >= 0 && !d.is_mig) {
            v->valueType = NVML_VALUE_TYPE_UNSIGNED_INT;
            v->nvmlReturn = NVML_SUCCESS;
            v->value.ullVal = 0;
            v->value.uiVal = (unsigned)d.memtemp;
        } else {
            v->nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
        }
    }
    return NVML_SUCCESS;
}

int nvmlDeviceGetGraphicsRunningProcesses_v3(void *device, unsigned int *count, nvmlProcessInfo_t *infos) {
    struct device d;
    int rc = enter(device, -1, &d);
    (void)infos;
    if (rc == NVML_SUCCESS) *count = 0; /* compute-only node */
    return rc;
}

int nvmlDeviceGetPowerManagementLimit(void *device, unsigned int *milliwatts) {
    struct device d;
    int rc = enter(device, -1, &d);
    if (rc == NVML_SUCCESS) *milliwatts = 700000;
    return rc;
}
