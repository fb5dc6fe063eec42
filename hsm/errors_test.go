package hsm

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"
)

func TestExplain(t *testing.T) {
	oaep := pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_OAEP, nil)
	for _, tc := range []struct {
		name string
		err  error
		want string
	}{
		{"wrong PIN", &Error{Token: "issuer", Err: Call("C_Login", nil, pkcs11.Error(pkcs11.CKR_PIN_INCORRECT))},
			`wrong PIN for token "issuer" (check the pin-source file)`},
		{"mechanism", &Error{Token: "issuer", Err: fmt.Errorf("unwrap S: %w", Call("C_UnwrapKey", pkcs11.NewMechanism(pkcs11.CKM_SHA1_KEY_DERIVATION, nil), pkcs11.Error(pkcs11.CKR_MECHANISM_INVALID)))},
			`token "issuer" does not support mechanism CKM_SHA1_KEY_DERIVATION (run ` + "`issuer probe`)"},
		{"bad c", Call("C_UnwrapKey", oaep, pkcs11.Error(pkcs11.CKR_ENCRYPTED_DATA_INVALID)),
			"the token rejects the ciphertext for CKM_RSA_PKCS_OAEP"},
		{"no mechanism known", pkcs11.Error(pkcs11.CKR_KEY_FUNCTION_NOT_PERMITTED), "does not permit the operation"},
		{"not trusted", pkcs11.Error(pkcs11.CKR_KEY_NOT_WRAPPABLE), "run `issuer kek`"},
		{"memory", pkcs11.Error(pkcs11.CKR_DEVICE_MEMORY), "out of memory"},
		{"signature", pkcs11.Error(pkcs11.CKR_SIGNATURE_INVALID), "does not verify"},
		{"unknown code", pkcs11.Error(0x80000001), ""},
		{"not pkcs11", errors.New("x"), ""},
		{"nil", nil, ""},
	} {
		got := Explain(tc.err)
		if (tc.want == "") != (got == "") || !strings.Contains(got, tc.want) {
			t.Errorf("%s: Explain = %q, want %q", tc.name, got, tc.want)
		}
	}
}

func TestErrorWrapping(t *testing.T) {
	inner := Call("C_DeriveKey", pkcs11.NewMechanism(pkcs11.CKM_ECDH1_DERIVE, nil), pkcs11.Error(pkcs11.CKR_MECHANISM_PARAM_INVALID))
	err := wrapToken("issuer", fmt.Errorf("derive K_I: %w", inner))
	var te *Error
	var ce *CallError
	var rv pkcs11.Error
	if !errors.As(err, &te) || !errors.As(err, &ce) || !errors.As(err, &rv) {
		t.Fatalf("errors.As fails on %v", err)
	}
	if te.Token != "issuer" || ce.Mech != "CKM_ECDH1_DERIVE" || rv != pkcs11.CKR_MECHANISM_PARAM_INVALID {
		t.Errorf("%+v %+v %v", te, ce, rv)
	}
	msg := err.Error()
	for _, want := range []string{`token "issuer" refuses the parameters of mechanism CKM_ECDH1_DERIVE`, "derive K_I", "C_DeriveKey(CKM_ECDH1_DERIVE)", "CKR_MECHANISM_PARAM_INVALID"} {
		if !strings.Contains(msg, want) {
			t.Errorf("%q lacks %q", msg, want)
		}
	}
	// Wrapped once only; plain errors and nil pass through.
	if again := wrapToken("other", err); again != err {
		t.Error("wrapped twice")
	}
	plain := errors.New("plain")
	if wrapToken("issuer", plain) != plain || wrapToken("issuer", nil) != nil {
		t.Error("wrapToken changed an error without a return code")
	}
	if Call("C_X", nil, nil) != nil {
		t.Error("Call(nil) != nil")
	}
	if IsRV(plain, pkcs11.CKR_OK) {
		t.Error("IsRV on a plain error")
	}
}
