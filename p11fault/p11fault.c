/*
 * p11fault: a PKCS#11 v2.40 module for tests that forwards every call to
 * a real module (SoftHSM2 in this project's tests) and, on command, fails
 * chosen calls with chosen return codes, delays them, or makes the token
 * vanish. See docs/HSM.md, "Fault injection for tests (p11fault)".
 *
 * The control file is "<path of this .so>.ctl". It is read at the first
 * C_GetFunctionList (which loads the real module it names) and again
 * whenever it changes (stat before every call; writers replace it by
 * rename, so a change is a new inode). One directive per line, '#' starts
 * a comment:
 *
 *   real PATH                  the real module (also: a line that is just
 *                              an absolute path); read once, at load
 *   fail FUNC RV [after=N] [count=M]
 *   delay FUNC MS [after=N] [count=M]
 *   vanish
 *
 * FUNC is a PKCS#11 function name (C_Decrypt) or '*' (every function but
 * C_GetFunctionList, C_GetInfo and C_Finalize). RV is a CKR_ name or a
 * number (0x30). A rule counts the calls that match it: the first N go
 * through untouched, the next M are failed (delayed); no count: all the
 * rest. Counters start at zero each time the file changes. Every rule
 * counts every call it matches; the delays of all rules in force add up
 * and are slept before the call, then the first fail rule in force (in
 * file order) answers instead of the real module.
 *
 * vanish: the token is gone. C_GetSlotList(tokenPresent=TRUE) lists no
 * slot, C_GetSlotInfo clears CKF_TOKEN_PRESENT, slot calls (C_GetTokenInfo,
 * C_OpenSession, C_InitToken, C_GetMechanismList/Info) answer
 * CKR_TOKEN_NOT_PRESENT and session calls CKR_DEVICE_REMOVED. When the
 * module first sees vanish it waits for the calls in flight and closes
 * every session of the real module (C_CloseAllSessions on every slot), so
 * that, once vanish is removed, old sessions are dead as after a real
 * device loss (CKR_SESSION_HANDLE_INVALID, logged out).
 *
 * Errors in the control file are reported on stderr ("p11fault: ...") and
 * the line is ignored.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <p11-kit/pkcs11.h>

#define EXPORT __attribute__((visibility("default")))

/* What a function does while the token has vanished. */
enum kind {
	K_LIBRARY, /* forwarded: C_Initialize, C_Finalize, C_GetInfo, ... */
	K_SLOTS,   /* forwarded, then edited: C_GetSlotList, C_GetSlotInfo */
	K_TOKEN,   /* CKR_TOKEN_NOT_PRESENT: calls about the token in a slot */
	K_SESSION, /* CKR_DEVICE_REMOVED: calls on a session */
	K_WAIT,    /* forwarded, outside the in-flight lock (may block) */
};

/* Every function of CK_FUNCTION_LIST (v2.40), in its order. */
#define FUNCTIONS(X)                                                          \
	X(C_Initialize, K_LIBRARY) X(C_Finalize, K_LIBRARY)                   \
	X(C_GetInfo, K_LIBRARY) X(C_GetFunctionList, K_LIBRARY)               \
	X(C_GetSlotList, K_SLOTS) X(C_GetSlotInfo, K_SLOTS)                   \
	X(C_GetTokenInfo, K_TOKEN) X(C_GetMechanismList, K_TOKEN)             \
	X(C_GetMechanismInfo, K_TOKEN) X(C_InitToken, K_TOKEN)                \
	X(C_InitPIN, K_SESSION) X(C_SetPIN, K_SESSION)                        \
	X(C_OpenSession, K_TOKEN) X(C_CloseSession, K_SESSION)                \
	X(C_CloseAllSessions, K_LIBRARY) X(C_GetSessionInfo, K_SESSION)       \
	X(C_GetOperationState, K_SESSION) X(C_SetOperationState, K_SESSION)   \
	X(C_Login, K_SESSION) X(C_Logout, K_SESSION)                          \
	X(C_CreateObject, K_SESSION) X(C_CopyObject, K_SESSION)               \
	X(C_DestroyObject, K_SESSION) X(C_GetObjectSize, K_SESSION)           \
	X(C_GetAttributeValue, K_SESSION) X(C_SetAttributeValue, K_SESSION)   \
	X(C_FindObjectsInit, K_SESSION) X(C_FindObjects, K_SESSION)           \
	X(C_FindObjectsFinal, K_SESSION) X(C_EncryptInit, K_SESSION)          \
	X(C_Encrypt, K_SESSION) X(C_EncryptUpdate, K_SESSION)                 \
	X(C_EncryptFinal, K_SESSION) X(C_DecryptInit, K_SESSION)              \
	X(C_Decrypt, K_SESSION) X(C_DecryptUpdate, K_SESSION)                 \
	X(C_DecryptFinal, K_SESSION) X(C_DigestInit, K_SESSION)               \
	X(C_Digest, K_SESSION) X(C_DigestUpdate, K_SESSION)                   \
	X(C_DigestKey, K_SESSION) X(C_DigestFinal, K_SESSION)                 \
	X(C_SignInit, K_SESSION) X(C_Sign, K_SESSION)                         \
	X(C_SignUpdate, K_SESSION) X(C_SignFinal, K_SESSION)                  \
	X(C_SignRecoverInit, K_SESSION) X(C_SignRecover, K_SESSION)           \
	X(C_VerifyInit, K_SESSION) X(C_Verify, K_SESSION)                     \
	X(C_VerifyUpdate, K_SESSION) X(C_VerifyFinal, K_SESSION)              \
	X(C_VerifyRecoverInit, K_SESSION) X(C_VerifyRecover, K_SESSION)       \
	X(C_DigestEncryptUpdate, K_SESSION) X(C_DecryptDigestUpdate, K_SESSION) \
	X(C_SignEncryptUpdate, K_SESSION) X(C_DecryptVerifyUpdate, K_SESSION) \
	X(C_GenerateKey, K_SESSION) X(C_GenerateKeyPair, K_SESSION)           \
	X(C_WrapKey, K_SESSION) X(C_UnwrapKey, K_SESSION)                     \
	X(C_DeriveKey, K_SESSION) X(C_SeedRandom, K_SESSION)                  \
	X(C_GenerateRandom, K_SESSION) X(C_GetFunctionStatus, K_SESSION)      \
	X(C_CancelFunction, K_SESSION) X(C_WaitForSlotEvent, K_WAIT)

#define AS_ENUM(name, kind) FN_##name,
enum { FUNCTIONS(AS_ENUM) N_FUNCTIONS };
#define AS_NAME(name, kind) #name,
static const char *const fn_names[N_FUNCTIONS] = { FUNCTIONS(AS_NAME) };
#define AS_KIND(name, kind) kind,
static const enum kind fn_kinds[N_FUNCTIONS] = { FUNCTIONS(AS_KIND) };

#define FN_ANY (-1)

/* Return codes by name (PKCS#11 v2.40). */
#define RVN(n) { #n, n },
static const struct {
	const char *name;
	CK_RV rv;
} rv_names[] = {
	RVN(CKR_OK) RVN(CKR_CANCEL) RVN(CKR_HOST_MEMORY) RVN(CKR_SLOT_ID_INVALID)
	RVN(CKR_GENERAL_ERROR) RVN(CKR_FUNCTION_FAILED) RVN(CKR_ARGUMENTS_BAD)
	RVN(CKR_NO_EVENT) RVN(CKR_NEED_TO_CREATE_THREADS) RVN(CKR_CANT_LOCK)
	RVN(CKR_ATTRIBUTE_READ_ONLY) RVN(CKR_ATTRIBUTE_SENSITIVE)
	RVN(CKR_ATTRIBUTE_TYPE_INVALID) RVN(CKR_ATTRIBUTE_VALUE_INVALID)
	RVN(CKR_ACTION_PROHIBITED) RVN(CKR_DATA_INVALID) RVN(CKR_DATA_LEN_RANGE)
	RVN(CKR_DEVICE_ERROR) RVN(CKR_DEVICE_MEMORY) RVN(CKR_DEVICE_REMOVED)
	RVN(CKR_ENCRYPTED_DATA_INVALID) RVN(CKR_ENCRYPTED_DATA_LEN_RANGE)
	RVN(CKR_FUNCTION_CANCELED) RVN(CKR_FUNCTION_NOT_PARALLEL)
	RVN(CKR_FUNCTION_NOT_SUPPORTED) RVN(CKR_KEY_HANDLE_INVALID)
	RVN(CKR_KEY_SIZE_RANGE) RVN(CKR_KEY_TYPE_INCONSISTENT)
	RVN(CKR_KEY_NOT_NEEDED) RVN(CKR_KEY_CHANGED) RVN(CKR_KEY_NEEDED)
	RVN(CKR_KEY_INDIGESTIBLE) RVN(CKR_KEY_FUNCTION_NOT_PERMITTED)
	RVN(CKR_KEY_NOT_WRAPPABLE) RVN(CKR_KEY_UNEXTRACTABLE)
	RVN(CKR_MECHANISM_INVALID) RVN(CKR_MECHANISM_PARAM_INVALID)
	RVN(CKR_OBJECT_HANDLE_INVALID) RVN(CKR_OPERATION_ACTIVE)
	RVN(CKR_OPERATION_NOT_INITIALIZED) RVN(CKR_PIN_INCORRECT)
	RVN(CKR_PIN_INVALID) RVN(CKR_PIN_LEN_RANGE) RVN(CKR_PIN_EXPIRED)
	RVN(CKR_PIN_LOCKED) RVN(CKR_SESSION_CLOSED) RVN(CKR_SESSION_COUNT)
	RVN(CKR_SESSION_HANDLE_INVALID) RVN(CKR_SESSION_PARALLEL_NOT_SUPPORTED)
	RVN(CKR_SESSION_READ_ONLY) RVN(CKR_SESSION_EXISTS)
	RVN(CKR_SESSION_READ_ONLY_EXISTS) RVN(CKR_SESSION_READ_WRITE_SO_EXISTS)
	RVN(CKR_SIGNATURE_INVALID) RVN(CKR_SIGNATURE_LEN_RANGE)
	RVN(CKR_TEMPLATE_INCOMPLETE) RVN(CKR_TEMPLATE_INCONSISTENT)
	RVN(CKR_TOKEN_NOT_PRESENT) RVN(CKR_TOKEN_NOT_RECOGNIZED)
	RVN(CKR_TOKEN_WRITE_PROTECTED) RVN(CKR_UNWRAPPING_KEY_HANDLE_INVALID)
	RVN(CKR_UNWRAPPING_KEY_SIZE_RANGE) RVN(CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT)
	RVN(CKR_USER_ALREADY_LOGGED_IN) RVN(CKR_USER_NOT_LOGGED_IN)
	RVN(CKR_USER_PIN_NOT_INITIALIZED) RVN(CKR_USER_TYPE_INVALID)
	RVN(CKR_USER_ANOTHER_ALREADY_LOGGED_IN) RVN(CKR_USER_TOO_MANY_TYPES)
	RVN(CKR_WRAPPED_KEY_INVALID) RVN(CKR_WRAPPED_KEY_LEN_RANGE)
	RVN(CKR_WRAPPING_KEY_HANDLE_INVALID) RVN(CKR_WRAPPING_KEY_SIZE_RANGE)
	RVN(CKR_WRAPPING_KEY_TYPE_INCONSISTENT) RVN(CKR_RANDOM_SEED_NOT_SUPPORTED)
	RVN(CKR_RANDOM_NO_RNG) RVN(CKR_DOMAIN_PARAMS_INVALID)
	RVN(CKR_CURVE_NOT_SUPPORTED) RVN(CKR_BUFFER_TOO_SMALL)
	RVN(CKR_SAVED_STATE_INVALID) RVN(CKR_INFORMATION_SENSITIVE)
	RVN(CKR_STATE_UNSAVEABLE) RVN(CKR_CRYPTOKI_NOT_INITIALIZED)
	RVN(CKR_CRYPTOKI_ALREADY_INITIALIZED) RVN(CKR_MUTEX_BAD)
	RVN(CKR_MUTEX_NOT_LOCKED) RVN(CKR_NEW_PIN_MODE) RVN(CKR_NEXT_OTP)
	RVN(CKR_EXCEEDED_MAX_ITERATIONS) RVN(CKR_FIPS_SELF_TEST_FAILED)
	RVN(CKR_LIBRARY_LOAD_FAILED) RVN(CKR_PIN_TOO_WEAK)
	RVN(CKR_PUBLIC_KEY_INVALID) RVN(CKR_FUNCTION_REJECTED)
};

enum rule_kind { R_FAIL, R_DELAY };

struct rule {
	enum rule_kind kind;
	int fn;              /* FN_… or FN_ANY */
	CK_RV rv;            /* R_FAIL */
	unsigned long ms;    /* R_DELAY */
	unsigned long after; /* matching calls let through first */
	unsigned long count; /* then this many affected; 0 with !limited: all */
	int limited;
	unsigned long seen;  /* matching calls so far */
};

/* The real module, loaded once by the first C_GetFunctionList. */
static pthread_once_t load_once = PTHREAD_ONCE_INIT;
static CK_RV load_rv = CKR_GENERAL_ERROR;
static CK_FUNCTION_LIST *real;
static char *ctl_path;

/*
 * mu guards the rule set and the control file's identity. inflight is
 * held shared by every forwarded call while it is in the real module,
 * and exclusively while vanish closes the real sessions (writers first,
 * so that a stream of calls cannot hold it off). A thread never takes mu
 * while it holds inflight.
 */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_rwlock_t inflight = PTHREAD_RWLOCK_WRITER_NONRECURSIVE_INITIALIZER_NP;
static struct rule *rules;
static size_t n_rules, cap_rules;
static int vanished;
static int ctl_present;
static struct stat ctl_stat;

static void complain(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	fputs("p11fault: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
}

static int parse_fn(const char *s)
{
	int i;

	if (strcmp(s, "*") == 0)
		return FN_ANY;
	for (i = 0; i < N_FUNCTIONS; i++)
		if (strcmp(s, fn_names[i]) == 0)
			return i;
	return -2;
}

static int parse_ulong(const char *s, unsigned long *v)
{
	char *end;

	if (*s == '\0' || *s == '-')
		return -1;
	errno = 0;
	*v = strtoul(s, &end, 0);
	return errno != 0 || *end != '\0' ? -1 : 0;
}

static int parse_rv(const char *s, CK_RV *rv)
{
	size_t i;
	unsigned long v;

	for (i = 0; i < sizeof rv_names / sizeof rv_names[0]; i++) {
		if (strcmp(s, rv_names[i].name) == 0) {
			*rv = rv_names[i].rv;
			return 0;
		}
	}
	if (parse_ulong(s, &v) != 0)
		return -1;
	*rv = v;
	return 0;
}

#define MAX_WORDS 8

/* split cuts line into words at blanks, after dropping a '#' comment. */
static int split(char *line, char **w)
{
	int n = 0;
	char *p, *save;

	if ((p = strchr(line, '#')) != NULL)
		*p = '\0';
	for (p = strtok_r(line, " \t\r\n", &save); p != NULL; p = strtok_r(NULL, " \t\r\n", &save)) {
		if (n == MAX_WORDS)
			return -1;
		w[n++] = p;
	}
	return n;
}

static void add_rule(const struct rule *r)
{
	if (n_rules == cap_rules) {
		size_t cap = cap_rules ? 2 * cap_rules : 16;
		struct rule *nr = realloc(rules, cap * sizeof *nr);
		if (nr == NULL) {
			complain("out of memory: rule ignored");
			return;
		}
		rules = nr;
		cap_rules = cap;
	}
	rules[n_rules++] = *r;
}

/* parse_rule reads "fail FUNC RV …" or "delay FUNC MS …" (w[0] is the verb). */
static int parse_rule(char **w, int n, struct rule *r, const char **why)
{
	int i;

	memset(r, 0, sizeof *r);
	r->kind = strcmp(w[0], "fail") == 0 ? R_FAIL : R_DELAY;
	if (n < 3) {
		*why = r->kind == R_FAIL ? "want: fail FUNC RV [after=N] [count=M]"
					 : "want: delay FUNC MILLISECONDS [after=N] [count=M]";
		return -1;
	}
	r->fn = parse_fn(w[1]);
	if (r->fn == -2) {
		*why = "unknown function (a PKCS#11 v2.40 name such as C_Decrypt, or *)";
		return -1;
	}
	if (r->fn == FN_C_GetFunctionList) {
		*why = "C_GetFunctionList cannot be failed or delayed";
		return -1;
	}
	if (r->kind == R_FAIL ? parse_rv(w[2], &r->rv) : parse_ulong(w[2], &r->ms)) {
		*why = r->kind == R_FAIL ? "bad return code (a CKR_ name or a number)" : "bad milliseconds";
		return -1;
	}
	for (i = 3; i < n; i++) {
		if (strncmp(w[i], "after=", 6) == 0 && parse_ulong(w[i] + 6, &r->after) == 0)
			continue;
		if (strncmp(w[i], "count=", 6) == 0 && parse_ulong(w[i] + 6, &r->count) == 0) {
			r->limited = 1;
			continue;
		}
		*why = "bad option (after=N or count=M)";
		return -1;
	}
	return 0;
}

/*
 * parse reads the control file from f into the rule set (replacing it)
 * and says whether it contains vanish. If realp is not NULL, it receives
 * the real module's path (malloc'd), if the file names one.
 */
static int parse(FILE *f, char **realp)
{
	char *line = NULL, *w[MAX_WORDS];
	size_t len = 0;
	int lineno = 0, van = 0, n;
	struct rule r;
	const char *why;

	n_rules = 0;
	while (getline(&line, &len, f) >= 0) {
		lineno++;
		n = split(line, w);
		if (n == 0)
			continue;
		why = NULL;
		if (n < 0) {
			why = "too many words";
		} else if (w[0][0] == '/' && n == 1) {
			if (realp != NULL && *realp == NULL)
				*realp = strdup(w[0]);
		} else if (strcmp(w[0], "real") == 0) {
			if (n != 2)
				why = "want: real PATH";
			else if (realp != NULL && *realp == NULL)
				*realp = strdup(w[1]);
		} else if (strcmp(w[0], "vanish") == 0) {
			if (n != 1)
				why = "want: vanish";
			else
				van = 1;
		} else if (strcmp(w[0], "fail") == 0 || strcmp(w[0], "delay") == 0) {
			if (parse_rule(w, n, &r, &why) == 0)
				add_rule(&r);
		} else {
			why = "unknown directive (real, fail, delay, vanish)";
		}
		if (why != NULL)
			complain("%s:%d: %s", ctl_path, lineno, why);
	}
	free(line);
	return van;
}

/* close_all closes every session of the real module, once no call is in it. */
static void close_all(void)
{
	CK_ULONG n = 0, i;
	CK_SLOT_ID *slots;

	pthread_rwlock_wrlock(&inflight);
	if (real->C_GetSlotList(CK_FALSE, NULL, &n) == CKR_OK && n > 0 &&
	    (slots = calloc(n, sizeof *slots)) != NULL) {
		if (real->C_GetSlotList(CK_FALSE, slots, &n) == CKR_OK)
			for (i = 0; i < n; i++)
				real->C_CloseAllSessions(slots[i]);
		free(slots);
	}
	pthread_rwlock_unlock(&inflight);
}

static int same_file(const struct stat *a, const struct stat *b)
{
	return a->st_dev == b->st_dev && a->st_ino == b->st_ino && a->st_size == b->st_size &&
	       a->st_mtim.tv_sec == b->st_mtim.tv_sec && a->st_mtim.tv_nsec == b->st_mtim.tv_nsec;
}

/* refresh re-reads the control file if it changed; mu is held. */
static void refresh(void)
{
	struct stat st;
	FILE *f;
	int van = 0;

	if (stat(ctl_path, &st) != 0) {
		if (!ctl_present)
			return;
		ctl_present = 0;
		n_rules = 0;
	} else {
		if (ctl_present && same_file(&st, &ctl_stat))
			return;
		f = fopen(ctl_path, "re");
		if (f == NULL || fstat(fileno(f), &st) != 0) {
			/* Replaced or removed in between: no rules, and try again next call. */
			if (f != NULL)
				fclose(f);
			ctl_present = 0;
			n_rules = 0;
		} else {
			ctl_present = 1;
			ctl_stat = st;
			van = parse(f, NULL);
			fclose(f);
		}
	}
	if (van && !vanished)
		close_all();
	vanished = van;
}

static int matches(const struct rule *r, int fn)
{
	if (r->fn == FN_ANY)
		return fn != FN_C_GetInfo && fn != FN_C_Finalize && fn != FN_C_GetFunctionList;
	return r->fn == fn;
}

static void sleep_ms(unsigned long ms)
{
	struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L };

	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

/*
 * enter applies the rules to a call of fn. It returns 1 with *rv set if
 * the call is answered here, or 0 if it is to be forwarded: then the
 * caller holds inflight (but for K_WAIT) and must call leave, and
 * *gone (if not NULL) says whether the token has vanished.
 */
static int enter(int fn, CK_RV *rv, int *gone)
{
	unsigned long ms = 0, k;
	int failed = 0, van;
	CK_RV frv = CKR_OK;
	size_t i;
	struct rule *r;

	pthread_mutex_lock(&mu);
	refresh();
	for (i = 0; i < n_rules; i++) {
		r = &rules[i];
		if (!matches(r, fn))
			continue;
		k = r->seen++;
		if (k < r->after || (r->limited && k - r->after >= r->count))
			continue;
		if (r->kind == R_DELAY) {
			ms += r->ms;
		} else if (!failed) {
			failed = 1;
			frv = r->rv;
		}
	}
	van = vanished;
	pthread_mutex_unlock(&mu);

	if (ms > 0)
		sleep_ms(ms);
	if (failed) {
		*rv = frv;
		return 1;
	}
	if (van && fn_kinds[fn] == K_TOKEN) {
		*rv = CKR_TOKEN_NOT_PRESENT;
		return 1;
	}
	if (van && fn_kinds[fn] == K_SESSION) {
		*rv = CKR_DEVICE_REMOVED;
		return 1;
	}
	if (gone != NULL)
		*gone = van;
	if (fn_kinds[fn] != K_WAIT)
		pthread_rwlock_rdlock(&inflight);
	return 0;
}

static void leave(int fn)
{
	if (fn_kinds[fn] != K_WAIT)
		pthread_rwlock_unlock(&inflight);
}

/* A wrapper that applies the rules and forwards. */
#define FORWARD(name, params, args)                        \
	static CK_RV w_##name params                       \
	{                                                  \
		CK_RV rv;                                  \
		if (enter(FN_##name, &rv, NULL))           \
			return rv;                         \
		rv = real->name args;                      \
		leave(FN_##name);                          \
		return rv;                                 \
	}

FORWARD(C_Initialize, (CK_VOID_PTR a), (a))
FORWARD(C_Finalize, (CK_VOID_PTR a), (a))
FORWARD(C_GetInfo, (CK_INFO_PTR a), (a))
FORWARD(C_GetTokenInfo, (CK_SLOT_ID a, CK_TOKEN_INFO_PTR b), (a, b))
FORWARD(C_GetMechanismList, (CK_SLOT_ID a, CK_MECHANISM_TYPE_PTR b, CK_ULONG_PTR c), (a, b, c))
FORWARD(C_GetMechanismInfo, (CK_SLOT_ID a, CK_MECHANISM_TYPE b, CK_MECHANISM_INFO_PTR c), (a, b, c))
FORWARD(C_InitToken, (CK_SLOT_ID a, CK_UTF8CHAR_PTR b, CK_ULONG c, CK_UTF8CHAR_PTR d), (a, b, c, d))
FORWARD(C_InitPIN, (CK_SESSION_HANDLE a, CK_UTF8CHAR_PTR b, CK_ULONG c), (a, b, c))
FORWARD(C_SetPIN, (CK_SESSION_HANDLE a, CK_UTF8CHAR_PTR b, CK_ULONG c, CK_UTF8CHAR_PTR d, CK_ULONG e),
	(a, b, c, d, e))
FORWARD(C_OpenSession, (CK_SLOT_ID a, CK_FLAGS b, CK_VOID_PTR c, CK_NOTIFY d, CK_SESSION_HANDLE_PTR e),
	(a, b, c, d, e))
FORWARD(C_CloseSession, (CK_SESSION_HANDLE a), (a))
FORWARD(C_CloseAllSessions, (CK_SLOT_ID a), (a))
FORWARD(C_GetSessionInfo, (CK_SESSION_HANDLE a, CK_SESSION_INFO_PTR b), (a, b))
FORWARD(C_GetOperationState, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG_PTR c), (a, b, c))
FORWARD(C_SetOperationState,
	(CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_OBJECT_HANDLE d, CK_OBJECT_HANDLE e),
	(a, b, c, d, e))
FORWARD(C_Login, (CK_SESSION_HANDLE a, CK_USER_TYPE b, CK_UTF8CHAR_PTR c, CK_ULONG d), (a, b, c, d))
FORWARD(C_Logout, (CK_SESSION_HANDLE a), (a))
FORWARD(C_CreateObject, (CK_SESSION_HANDLE a, CK_ATTRIBUTE_PTR b, CK_ULONG c, CK_OBJECT_HANDLE_PTR d),
	(a, b, c, d))
FORWARD(C_CopyObject,
	(CK_SESSION_HANDLE a, CK_OBJECT_HANDLE b, CK_ATTRIBUTE_PTR c, CK_ULONG d, CK_OBJECT_HANDLE_PTR e),
	(a, b, c, d, e))
FORWARD(C_DestroyObject, (CK_SESSION_HANDLE a, CK_OBJECT_HANDLE b), (a, b))
FORWARD(C_GetObjectSize, (CK_SESSION_HANDLE a, CK_OBJECT_HANDLE b, CK_ULONG_PTR c), (a, b, c))
FORWARD(C_GetAttributeValue, (CK_SESSION_HANDLE a, CK_OBJECT_HANDLE b, CK_ATTRIBUTE_PTR c, CK_ULONG d),
	(a, b, c, d))
FORWARD(C_SetAttributeValue, (CK_SESSION_HANDLE a, CK_OBJECT_HANDLE b, CK_ATTRIBUTE_PTR c, CK_ULONG d),
	(a, b, c, d))
FORWARD(C_FindObjectsInit, (CK_SESSION_HANDLE a, CK_ATTRIBUTE_PTR b, CK_ULONG c), (a, b, c))
FORWARD(C_FindObjects, (CK_SESSION_HANDLE a, CK_OBJECT_HANDLE_PTR b, CK_ULONG c, CK_ULONG_PTR d),
	(a, b, c, d))
FORWARD(C_FindObjectsFinal, (CK_SESSION_HANDLE a), (a))
FORWARD(C_EncryptInit, (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c), (a, b, c))
FORWARD(C_Encrypt, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e),
	(a, b, c, d, e))
FORWARD(C_EncryptUpdate, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e),
	(a, b, c, d, e))
FORWARD(C_EncryptFinal, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG_PTR c), (a, b, c))
FORWARD(C_DecryptInit, (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c), (a, b, c))
FORWARD(C_Decrypt, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e),
	(a, b, c, d, e))
FORWARD(C_DecryptUpdate, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e),
	(a, b, c, d, e))
FORWARD(C_DecryptFinal, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG_PTR c), (a, b, c))
FORWARD(C_DigestInit, (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b), (a, b))
FORWARD(C_Digest, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e),
	(a, b, c, d, e))
FORWARD(C_DigestUpdate, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c), (a, b, c))
FORWARD(C_DigestKey, (CK_SESSION_HANDLE a, CK_OBJECT_HANDLE b), (a, b))
FORWARD(C_DigestFinal, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG_PTR c), (a, b, c))
FORWARD(C_SignInit, (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c), (a, b, c))
FORWARD(C_Sign, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e),
	(a, b, c, d, e))
FORWARD(C_SignUpdate, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c), (a, b, c))
FORWARD(C_SignFinal, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG_PTR c), (a, b, c))
FORWARD(C_SignRecoverInit, (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c), (a, b, c))
FORWARD(C_SignRecover, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e),
	(a, b, c, d, e))
FORWARD(C_VerifyInit, (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c), (a, b, c))
FORWARD(C_Verify, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG e),
	(a, b, c, d, e))
FORWARD(C_VerifyUpdate, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c), (a, b, c))
FORWARD(C_VerifyFinal, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c), (a, b, c))
FORWARD(C_VerifyRecoverInit, (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c), (a, b, c))
FORWARD(C_VerifyRecover, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e),
	(a, b, c, d, e))
FORWARD(C_DigestEncryptUpdate,
	(CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e), (a, b, c, d, e))
FORWARD(C_DecryptDigestUpdate,
	(CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e), (a, b, c, d, e))
FORWARD(C_SignEncryptUpdate,
	(CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e), (a, b, c, d, e))
FORWARD(C_DecryptVerifyUpdate,
	(CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e), (a, b, c, d, e))
FORWARD(C_GenerateKey,
	(CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_ATTRIBUTE_PTR c, CK_ULONG d, CK_OBJECT_HANDLE_PTR e),
	(a, b, c, d, e))
FORWARD(C_GenerateKeyPair,
	(CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_ATTRIBUTE_PTR c, CK_ULONG d, CK_ATTRIBUTE_PTR e,
	 CK_ULONG f, CK_OBJECT_HANDLE_PTR g, CK_OBJECT_HANDLE_PTR h),
	(a, b, c, d, e, f, g, h))
FORWARD(C_WrapKey,
	(CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c, CK_OBJECT_HANDLE d, CK_BYTE_PTR e,
	 CK_ULONG_PTR f),
	(a, b, c, d, e, f))
FORWARD(C_UnwrapKey,
	(CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c, CK_BYTE_PTR d, CK_ULONG e,
	 CK_ATTRIBUTE_PTR f, CK_ULONG g, CK_OBJECT_HANDLE_PTR h),
	(a, b, c, d, e, f, g, h))
FORWARD(C_DeriveKey,
	(CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c, CK_ATTRIBUTE_PTR d, CK_ULONG e,
	 CK_OBJECT_HANDLE_PTR f),
	(a, b, c, d, e, f))
FORWARD(C_SeedRandom, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c), (a, b, c))
FORWARD(C_GenerateRandom, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c), (a, b, c))
FORWARD(C_GetFunctionStatus, (CK_SESSION_HANDLE a), (a))
FORWARD(C_CancelFunction, (CK_SESSION_HANDLE a), (a))
FORWARD(C_WaitForSlotEvent, (CK_FLAGS a, CK_SLOT_ID_PTR b, CK_VOID_PTR c), (a, b, c))

/* While the token has vanished, no slot has a token. */
static CK_RV w_C_GetSlotList(CK_BBOOL present, CK_SLOT_ID_PTR list, CK_ULONG_PTR n)
{
	CK_RV rv;
	int gone;

	if (enter(FN_C_GetSlotList, &rv, &gone))
		return rv;
	if (gone && present) {
		leave(FN_C_GetSlotList);
		if (n == NULL)
			return CKR_ARGUMENTS_BAD;
		*n = 0;
		return CKR_OK;
	}
	rv = real->C_GetSlotList(present, list, n);
	leave(FN_C_GetSlotList);
	return rv;
}

static CK_RV w_C_GetSlotInfo(CK_SLOT_ID slot, CK_SLOT_INFO_PTR info)
{
	CK_RV rv;
	int gone;

	if (enter(FN_C_GetSlotInfo, &rv, &gone))
		return rv;
	rv = real->C_GetSlotInfo(slot, info);
	leave(FN_C_GetSlotInfo);
	if (rv == CKR_OK && gone && info != NULL)
		info->flags &= ~CKF_TOKEN_PRESENT;
	return rv;
}

static CK_RV w_C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list);

#define AS_ENTRY(name, kind) .name = w_##name,
static CK_FUNCTION_LIST functions = {
	.version = { CRYPTOKI_VERSION_MAJOR, CRYPTOKI_VERSION_MINOR },
	FUNCTIONS(AS_ENTRY)
};

/* load finds the control file next to this module and loads the real module it names. */
static void load(void)
{
	Dl_info di;
	FILE *f;
	char *path = NULL;
	void *h;
	CK_C_GetFunctionList get;

	if (dladdr((void *)&load, &di) == 0 || di.dli_fname == NULL) {
		complain("dladdr: cannot find this module's own path");
		return;
	}
	if ((ctl_path = malloc(strlen(di.dli_fname) + 5)) == NULL)
		return;
	sprintf(ctl_path, "%s.ctl", di.dli_fname);
	pthread_mutex_lock(&mu);
	f = fopen(ctl_path, "re");
	if (f != NULL) {
		if (fstat(fileno(f), &ctl_stat) == 0) {
			ctl_present = 1;
			/* A token that has vanished at load has no sessions to close. */
			vanished = parse(f, &path);
		}
		fclose(f);
	}
	pthread_mutex_unlock(&mu);
	if (path == NULL) {
		complain("%s: no real module named (a line \"real /path/to/module.so\")", ctl_path);
		return;
	}
	h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
	if (h == NULL) {
		complain("%s", dlerror());
		free(path);
		return;
	}
	get = (CK_C_GetFunctionList)dlsym(h, "C_GetFunctionList");
	if (get == NULL) {
		complain("%s: no C_GetFunctionList", path);
		free(path);
		return;
	}
	free(path);
	load_rv = get(&real);
	if (load_rv == CKR_OK && real == NULL)
		load_rv = CKR_GENERAL_ERROR;
	if (load_rv == CKR_OK)
		functions.version = real->version;
}

static CK_RV w_C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list)
{
	pthread_once(&load_once, load);
	if (load_rv != CKR_OK)
		return load_rv;
	if (list == NULL)
		return CKR_ARGUMENTS_BAD;
	*list = &functions;
	return CKR_OK;
}

EXPORT CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list)
{
	return w_C_GetFunctionList(list);
}
