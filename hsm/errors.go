package hsm

import (
	"errors"
	"fmt"

	"github.com/miekg/pkcs11"
)

// Error is a failure of a PKCS#11 call on a named token. Its message
// leads with what a person can do about it (see Explain) and keeps the
// underlying error, so errors.As finds both *Error and pkcs11.Error.
type Error struct {
	Token string // token label
	Err   error  // wraps a pkcs11.Error, possibly inside a *CallError
}

func (e *Error) Error() string {
	if hint := explain(e.Token, e.Err); hint != "" {
		return fmt.Sprintf("%s (%v)", hint, e.Err)
	}
	return fmt.Sprintf("token %q: %v", e.Token, e.Err)
}

func (e *Error) Unwrap() error { return e.Err }

// CallError records which PKCS#11 function failed and with which
// mechanism, so that an explanation can name the mechanism ("token X does
// not support CKM_SHA1_KEY_DERIVATION"): the return code alone cannot.
type CallError struct {
	Call string // "C_UnwrapKey"
	Mech string // "CKM_RSA_PKCS_OAEP", or "" when the call takes none
	Err  error
}

func (e *CallError) Error() string {
	if e.Mech != "" {
		return fmt.Sprintf("%s(%s): %v", e.Call, e.Mech, e.Err)
	}
	return fmt.Sprintf("%s: %v", e.Call, e.Err)
}

func (e *CallError) Unwrap() error { return e.Err }

// Call wraps err (if not nil) as a *CallError naming the function and the
// mechanism (nil for calls without one). Chains wrap every PKCS#11 call's
// error with it.
func Call(call string, mech *pkcs11.Mechanism, err error) error {
	if err == nil {
		return nil
	}
	e := &CallError{Call: call, Err: err}
	if mech != nil {
		e.Mech = MechName(mech.Mechanism)
	}
	return e
}

// RV returns the PKCS#11 return code inside err, if there is one.
func RV(err error) (pkcs11.Error, bool) {
	var rv pkcs11.Error
	if errors.As(err, &rv) {
		return rv, true
	}
	return 0, false
}

// IsRV reports whether err carries the PKCS#11 return code rv.
func IsRV(err error, rv uint) bool {
	got, ok := RV(err)
	return ok && uint(got) == rv
}

// hints says, per return code, what a person should check. %[1]s is the
// token ("token \"label\""), %[2]s the mechanism name (or "the operation").
var hints = map[uint]string{
	pkcs11.CKR_PIN_INCORRECT:                  "wrong PIN for %[1]s (check the pin-source file)",
	pkcs11.CKR_PIN_LOCKED:                     "the PIN of %[1]s is locked after too many wrong attempts (the security officer must reset it)",
	pkcs11.CKR_PIN_EXPIRED:                    "the PIN of %[1]s has expired (set a new one with the token's tools)",
	pkcs11.CKR_PIN_LEN_RANGE:                  "the PIN for %[1]s has the wrong length (check the pin-source file for stray characters)",
	pkcs11.CKR_USER_PIN_NOT_INITIALIZED:       "%[1]s has no user PIN yet (initialize the token first)",
	pkcs11.CKR_USER_NOT_LOGGED_IN:             "not logged in to %[1]s (the session lost its login; check the PIN and that no other process logs out)",
	pkcs11.CKR_USER_TYPE_INVALID:              "%[1]s does not accept this kind of login",
	pkcs11.CKR_USER_ANOTHER_ALREADY_LOGGED_IN: "another user is logged in to %[1]s in this process (security-officer and user work cannot overlap)",
	pkcs11.CKR_SESSION_READ_ONLY_EXISTS:       "%[1]s has read-only sessions open, so the security officer cannot log in",
	pkcs11.CKR_MECHANISM_INVALID:              "%[1]s does not support mechanism %[2]s (run `issuer probe`)",
	pkcs11.CKR_MECHANISM_PARAM_INVALID:        "%[1]s refuses the parameters of mechanism %[2]s (run `issuer probe`)",
	pkcs11.CKR_TOKEN_NOT_PRESENT:              "%[1]s is not present (is the device connected, the token directory readable?)",
	pkcs11.CKR_TOKEN_NOT_RECOGNIZED:           "%[1]s is not recognized by its module",
	pkcs11.CKR_TOKEN_WRITE_PROTECTED:          "%[1]s is write-protected",
	pkcs11.CKR_DEVICE_REMOVED:                 "%[1]s was removed",
	pkcs11.CKR_DEVICE_ERROR:                   "%[1]s reports a device error",
	pkcs11.CKR_DEVICE_MEMORY:                  "%[1]s is out of memory (too many objects or sessions: destroy leftover objects, use fewer sessions)",
	pkcs11.CKR_HOST_MEMORY:                    "the PKCS#11 module of %[1]s ran out of host memory",
	pkcs11.CKR_SESSION_COUNT:                  "%[1]s refuses more sessions (lower --sessions)",
	pkcs11.CKR_KEY_FUNCTION_NOT_PERMITTED:     "a key on %[1]s does not permit %[2]s (its CKA_ usage attributes forbid it: wrong key, or a key made for another use)",
	pkcs11.CKR_KEY_TYPE_INCONSISTENT:          "a key on %[1]s has the wrong type for %[2]s (RSA key for an EC profile, or the reverse?)",
	pkcs11.CKR_KEY_SIZE_RANGE:                 "%[1]s does not support this key size for %[2]s",
	pkcs11.CKR_KEY_HANDLE_INVALID:             "a key handle is no longer valid on %[1]s (was the key deleted, or the token re-initialized?)",
	pkcs11.CKR_OBJECT_HANDLE_INVALID:          "an object handle is no longer valid on %[1]s (was the object deleted, or the token re-initialized?)",
	pkcs11.CKR_KEY_UNEXTRACTABLE:              "%[1]s refuses to wrap a non-extractable key",
	pkcs11.CKR_KEY_NOT_WRAPPABLE:              "%[1]s refuses to wrap this key (CKA_WRAP_WITH_TRUSTED needs a KEK marked CKA_TRUSTED by the security officer: run `issuer kek`)",
	pkcs11.CKR_WRAPPING_KEY_HANDLE_INVALID:    "the wrapping key (KEK) is missing on %[1]s",
	pkcs11.CKR_UNWRAPPING_KEY_HANDLE_INVALID:  "the unwrapping key is missing on %[1]s",
	pkcs11.CKR_ENCRYPTED_DATA_INVALID:         "%[1]s rejects the ciphertext for %[2]s: it was not made for this key (bad c from a card, wrong issuer key, or a corrupted record)",
	pkcs11.CKR_ENCRYPTED_DATA_LEN_RANGE:       "%[1]s rejects the ciphertext length for %[2]s (c has the wrong length for this issuer key)",
	pkcs11.CKR_DATA_LEN_RANGE:                 "%[1]s rejects the input length for %[2]s",
	pkcs11.CKR_WRAPPED_KEY_INVALID:            "%[1]s rejects a wrapped key for %[2]s: the blob is corrupt or was wrapped under another KEK",
	pkcs11.CKR_WRAPPED_KEY_LEN_RANGE:          "%[1]s rejects the length of a wrapped key for %[2]s (truncated or corrupt blob)",
	pkcs11.CKR_SIGNATURE_INVALID:              "the MAC or signature does not verify on %[1]s (%[2]s): wrong key or tampered data",
	pkcs11.CKR_SIGNATURE_LEN_RANGE:            "the MAC or signature has the wrong length for %[2]s on %[1]s",
	pkcs11.CKR_TEMPLATE_INCONSISTENT:          "%[1]s refuses the attribute template of %[2]s",
	pkcs11.CKR_TEMPLATE_INCOMPLETE:            "%[1]s needs more attributes than given to %[2]s",
	pkcs11.CKR_ATTRIBUTE_VALUE_INVALID:        "%[1]s refuses an attribute value given to %[2]s",
	pkcs11.CKR_ATTRIBUTE_TYPE_INVALID:         "%[1]s does not know an attribute asked for",
	pkcs11.CKR_ATTRIBUTE_READ_ONLY:            "%[1]s refuses to set a read-only attribute (CKA_TRUSTED needs the security officer)",
	pkcs11.CKR_ATTRIBUTE_SENSITIVE:            "%[1]s refuses to reveal a sensitive attribute (as it should)",
	pkcs11.CKR_SESSION_HANDLE_INVALID:         "a session on %[1]s is no longer valid",
	pkcs11.CKR_SESSION_CLOSED:                 "a session on %[1]s was closed",
	pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED:       "the PKCS#11 module of %[1]s is not initialized",
	pkcs11.CKR_ARGUMENTS_BAD:                  "%[1]s refuses the arguments of %[2]s (an unsupported parameter, e.g. OAEP with SHA-256 on SoftHSM2, or RSA exponent 3 on NSS)",
	pkcs11.CKR_FUNCTION_NOT_SUPPORTED:         "%[1]s does not implement this PKCS#11 function",
	pkcs11.CKR_FUNCTION_FAILED:                "%[1]s failed to perform %[2]s",
	pkcs11.CKR_GENERAL_ERROR:                  "%[1]s reports a general error",
}

// Explain turns an error carrying a PKCS#11 return code into a sentence
// that says what to check, naming the token (if err is or wraps an *Error)
// and the mechanism (if it wraps a *CallError). It returns "" when err
// carries no return code it knows.
func Explain(err error) string {
	label := ""
	var te *Error
	if errors.As(err, &te) {
		label = te.Token
	}
	return explain(label, err)
}

func explain(label string, err error) string {
	rv, ok := RV(err)
	if !ok {
		return ""
	}
	hint, ok := hints[uint(rv)]
	if !ok {
		return ""
	}
	tok := "the token"
	if label != "" {
		tok = fmt.Sprintf("token %q", label)
	}
	mech := "the operation"
	var ce *CallError
	if errors.As(err, &ce) && ce.Mech != "" {
		mech = ce.Mech
	}
	return fmt.Sprintf(hint, tok, mech)
}

// wrap makes err an *Error of this token unless it already is one, or
// carries no PKCS#11 return code.
func wrapToken(label string, err error) error {
	if err == nil {
		return nil
	}
	var te *Error
	if errors.As(err, &te) {
		return err
	}
	if _, ok := RV(err); !ok {
		return err
	}
	return &Error{Token: label, Err: err}
}
