package hsm

import (
	"github.com/miekg/pkcs11"

	"blindperso/protocol"
)

// Published vendor tables: rows written from the vendors' published
// mechanism lists and documentation, not measured here (Published true).
// docs/HSM.md, "Published vendor tables", quotes each source. When one of
// these tokens is probed for real, correct its row from the probe's notes
// and move it to the measured rows (mechanisms.go).

// Vendor mechanism codes the published tables use.
const (
	// Thales Luna 7 (thalesdocs.com, Luna Network HSM 7 SDK reference).
	mechLunaAESKW      uint = 0x80000170 // CKM_AES_KW: RFC 3394
	mechLunaAESKWP     uint = 0x80000171 // CKM_AES_KWP: RFC 5649
	mechLunaNISTPRFKDF uint = 0x80000A02 // CKM_NIST_PRF_KDF: SP 800-108 counter mode, CK_PRF_KDF_PARAMS

	// AWS CloudHSM Client SDK 5 (cloudhsm_pkcs11_vendor_defs.h).
	mechCloudHSMKeyWrapNoPad    uint = 0x80002109 // CKM_CLOUDHSM_AES_KEY_WRAP_NO_PAD: RFC 3394
	mechCloudHSMKeyWrapPKCS5Pad uint = 0x8000210A // CKM_CLOUDHSM_AES_KEY_WRAP_PKCS5_PAD: RFC 3394 + PKCS #5
	mechCloudHSMKeyWrapZeroPad  uint = 0x8000216F // CKM_CLOUDHSM_AES_KEY_WRAP_ZERO_PAD: RFC 5649 per AWS
	mechCloudHSMSP800108Counter uint = 0x80000001 // CKM_SP800_108_COUNTER_KDF as CloudHSM defines it
)

// The profiles a published table assesses (docs/PROTOCOL.md §3.4).
var (
	profRSARawSHA1   = protocol.RSARawSHA1.Name
	profRSAOAEPSHA1  = protocol.RSAOAEPSHA1.Name
	profRSAOAEPAES   = protocol.RSAOAEPAES.Name
	profECDHX963     = protocol.ECDHP256X963.Name
	profECDHAES      = protocol.ECDHP256AES.Name
	profRSAOAEPKBKDF = protocol.RSAOAEPKBKDF.Name
	profECDHKBKDF    = protocol.ECDHP256KBKDF.Name
)

// unsuitableCommon ends every refusal: what the issuer needs, so that an
// HSM team can tell whether another product or configuration qualifies.
const unsuitableCommon = " The issuer needs C_UnwrapKey (RSA-OAEP) or C_DeriveKey (ECDH) whose result stays " +
	"inside the device as a sensitive, non-extractable key object, AES-CMAC under that object, and AES key wrap " +
	"of K_I under a KEK (docs/HSM.md, \"Published vendor tables\"). Choose a token that has them; " +
	"no setting of this project can make this one safe."

var published = []vendor{
	// Thales Luna 7. LunaCM lists a Luna Network HSM 7 partition with
	// "Model -> LunaSA 7.x.y"; the Luna client's slots report manufacturer
	// "Safenet, Inc.". A Luna PCIe/USB 7 or an HA group may report other
	// strings: name the table in the URI (x-blindperso-table=luna7).
	{[]tokenID{{"Safenet, Inc.", "LunaSA 7"}}, Mechanisms{
		Name:                 "Thales Luna 7",
		Key:                  "luna7",
		Published:            true,
		Source:               "thalesdocs.com/gphsm/luna/7/docs/network/Content/sdk/ (mechanisms CKM_AES_KW, CKM_AES_KWP, CKM_NIST_PRF_KDF, CKM_RSA_PKCS; using/ECDH_with_Key-Derive-Function; design/attribute_defaults); DESIGN.md §11",
		KeyWrapRFC5649:       mechLunaAESKWP,
		KeyWrapRFC3394:       mechLunaAESKW,
		SP800108Counter:      mechLunaNISTPRFKDF,
		SP800108VendorParams: true,
		// "RSA public exponent value e=3 was deprecated, and Luna HSM
		// does not support its use in FIPS 140 configuration."
		RSAExponent: 65537,
		VendorMechNames: map[uint]string{
			mechLunaAESKW:      "CKM_AES_KW (Luna)",
			mechLunaAESKWP:     "CKM_AES_KWP (Luna)",
			mechLunaNISTPRFKDF: "CKM_NIST_PRF_KDF (Luna)",
		},
		Claims: []ProfileClaim{
			{profRSARawSHA1, ClaimMissing, "no CKM_CONCATENATE_BASE_AND_DATA or CKM_SHA1_KEY_DERIVATION in the published list"},
			{profRSAOAEPSHA1, ClaimMissing, "no CKM_CONCATENATE_BASE_AND_DATA or CKM_SHA1_KEY_DERIVATION in the published list"},
			{profRSAOAEPAES, ClaimRuns, "CKM_RSA_PKCS_OAEP unwrap, CKM_AES_ECB_ENCRYPT_DATA, CKM_AES_CMAC; K_I wrapped with CKM_AES_KWP (0x80000171)"},
			{profECDHX963, ClaimRuns, "CKM_ECDH1_DERIVE with CKD_SHA1_KDF (since firmware 7.0.1)"},
			{profECDHAES, ClaimRuns, "CKM_ECDH1_DERIVE with CKD_NULL (since firmware 7.0.1), then CKM_AES_ECB_ENCRYPT_DATA"},
			{profRSAOAEPKBKDF, ClaimUnknown, "needs CKM_SP800_108_COUNTER_KDF: Luna has SP 800-108 counter mode only as vendor CKM_NIST_PRF_KDF (0x80000A02) with its own CK_PRF_KDF_PARAMS; its PRF HMAC_SHA256 and LUNA_PRF_KDF_ENCODING_SCHEME_3 (counter 4 bytes ‖ label ‖ 0x00 ‖ context ‖ length 4 bytes) are the profile's layout, so it runs once the chain builds that structure"},
			{profECDHKBKDF, ClaimUnknown, "CKM_ECDH1_DERIVE with CKD_NULL is there; the KDF needs CKM_SP800_108_COUNTER_KDF, which Luna has only as vendor CKM_NIST_PRF_KDF (0x80000A02, HMAC_SHA256, ENCODING_SCHEME_3) with its own parameters"},
		},
	}},

	// Entrust nShield 5 (Security World 13.x PKCS #11 library): the
	// token reports manufacturerID "nCipher Corp. Ltd" and an empty model.
	{[]tokenID{{"nCipher Corp. Ltd", ""}}, Mechanisms{
		Name:           "Entrust nShield 5",
		Key:            "nshield5",
		Published:      true,
		Source:         "nshielddocs.entrust.com/security-world-docs/v13.6.3/api-pkcs11/mechanisms.html (mechanism table); DESIGN.md §11",
		KeyWrapRFC5649: MechAESKeyWrapKWP,
		RSAExponent:    65537,
		Claims: []ProfileClaim{
			{profRSARawSHA1, ClaimMissing, "CKM_CONCATENATE_BASE_AND_KEY is listed, CKM_CONCATENATE_BASE_AND_DATA is not"},
			{profRSAOAEPSHA1, ClaimMissing, "CKM_CONCATENATE_BASE_AND_KEY is listed, CKM_CONCATENATE_BASE_AND_DATA is not"},
			{profRSAOAEPAES, ClaimUnknown, "CKM_AES_ECB_ENCRYPT_DATA, CKM_AES_CMAC and CKM_AES_KEY_WRAP_KWP (0x210B) are listed; the CKM_RSA_PKCS_OAEP row was not read here"},
			{profECDHX963, ClaimUnknown, "CKM_ECDH1_DERIVE is listed with a footnote on its KDFs that was not read here; CKD_SHA1_KDF unconfirmed"},
			{profECDHAES, ClaimUnknown, "CKM_ECDH1_DERIVE and CKM_AES_ECB_ENCRYPT_DATA are listed; whether ECDH takes CKD_NULL is in the footnote not read"},
			{profRSAOAEPKBKDF, ClaimUnknown, "needs CKM_SP800_108_COUNTER_KDF (or the vendor's equivalent): not in the part of the list read"},
			{profECDHKBKDF, ClaimUnknown, "needs CKM_SP800_108_COUNTER_KDF (or the vendor's equivalent): not in the part of the list read"},
		},
	}},

	// AWS CloudHSM, Client SDK 5 PKCS #11 library. Its CK_TOKEN_INFO
	// manufacturerID and model are not published (the token label is
	// "hsm1"): name the table in the URI (x-blindperso-table=cloudhsm5).
	{nil, Mechanisms{
		Name:                 "AWS CloudHSM (Client SDK 5)",
		Key:                  "cloudhsm5",
		Published:            true,
		Source:               "docs.aws.amazon.com/cloudhsm/latest/userguide/pkcs11-mechanisms.html, pkcs11-apis.html, manage-aes-key-wrapping.html, modify-attr.html, key_attribute_background.html; aws-samples/aws-cloudhsm-pkcs11-examples include/pkcs11/v2.40/cloudhsm_pkcs11_vendor_defs.h",
		KeyWrapRFC5649:       mechCloudHSMKeyWrapZeroPad,
		KeyWrapRFC3394:       mechCloudHSMKeyWrapNoPad,
		SP800108Counter:      mechCloudHSMSP800108Counter,
		SP800108VendorParams: true,
		RSAExponent:          65537,
		// CKA_TRUSTED is set by a crypto officer only; a key with
		// CKA_WRAP_WITH_TRUSTED wraps only under a trusted key.
		EnforcesWrapWithTrusted: true,
		VendorMechNames: map[uint]string{
			mechCloudHSMKeyWrapNoPad:    "CKM_CLOUDHSM_AES_KEY_WRAP_NO_PAD",
			mechCloudHSMKeyWrapPKCS5Pad: "CKM_CLOUDHSM_AES_KEY_WRAP_PKCS5_PAD",
			mechCloudHSMKeyWrapZeroPad:  "CKM_CLOUDHSM_AES_KEY_WRAP_ZERO_PAD",
			mechCloudHSMSP800108Counter: "CKM_SP800_108_COUNTER_KDF (CloudHSM)",
		},
		Claims: []ProfileClaim{
			{profRSARawSHA1, ClaimMissing, "CKM_RSA_X_509 is listed for encrypt/decrypt and sign only, not unwrap; no CKM_CONCATENATE_BASE_AND_DATA or CKM_SHA1_KEY_DERIVATION"},
			{profRSAOAEPSHA1, ClaimMissing, "no CKM_CONCATENATE_BASE_AND_DATA or CKM_SHA1_KEY_DERIVATION"},
			{profRSAOAEPAES, ClaimMissing, "CKM_RSA_PKCS_OAEP unwrap (SHA-1…SHA-512) is listed, but no CKM_AES_ECB_ENCRYPT_DATA: the only derive mechanisms are CKM_SP800_108_COUNTER_KDF and CKM_ECDH1_DERIVE"},
			{profECDHX963, ClaimUnknown, "CKM_ECDH1_DERIVE only with vendor KDF types (CKD_CLOUDHSM_X963_SHA1_KDF: X9.63 with SHA-1, RFC 8418 §2.1, as CKD_SHA1_KDF computes); their codes are in cloudhsm_pkcs11_vendor_defs.h, not on the page"},
			{profECDHAES, ClaimMissing, "no CKD_NULL for CKM_ECDH1_DERIVE and no CKM_AES_ECB_ENCRYPT_DATA"},
			{profRSAOAEPKBKDF, ClaimUnknown, "OAEP unwrap into a generic secret, then CKM_SP800_108_COUNTER_KDF as CloudHSM defines it (0x80000001, PRF HMAC-SHA-1…512, its own CK_SP800_108_KDF_PARAMS of typed counter, label, context, length and byte-array parts; the 0x00 separator would be a byte-array part): runs once the chain builds that structure"},
			{profECDHKBKDF, ClaimMissing, "needs a raw ECDH secret (CKD_NULL) to feed the KDF; CKM_ECDH1_DERIVE is offered only with X9.63 KDFs"},
		},
	}},

	// Utimaco CryptoServer / u.trust GP HSM (PKCS#11 R2/R3 library): the
	// token reports "Utimaco IS GmbH" / "CryptoServer". No published
	// mechanism list could be read here; only the identity is recorded.
	{[]tokenID{{"Utimaco IS GmbH", "CryptoServer"}}, Mechanisms{
		Name:           "Utimaco CryptoServer",
		Key:            "utimaco",
		Published:      true,
		Source:         "token identity from pkcs11-tool --list-slots on libcs_pkcs11_R3.so (public setup guide); the CryptoServer PKCS#11 R2 Developer Guide (doc. 2012-0007) exists but its mechanism chapter was not readable: every other value is the generic table's",
		KeyWrapRFC5649: pkcs11.CKM_AES_KEY_WRAP_PAD,
		RSAExponent:    65537,
	}},

	// YubiHSM 2, yubihsm_pkcs11: C_GetTokenInfo fills manufacturerID
	// "Yubico (www.yubico.com)" and model "YubiHSM".
	{[]tokenID{{"Yubico (www.yubico.com)", "YubiHSM"}}, Mechanisms{
		Name:           "YubiHSM 2",
		Key:            "yubihsm2",
		Published:      true,
		Source:         "Yubico/yubihsm-shell pkcs11/yubihsm_pkcs11.c (C_GetTokenInfo, C_DeriveKey, C_UnwrapKey, C_CopyObject); developers.yubico.com/YubiHSM2/Commands/Derive_Ecdh.html",
		KeyWrapRFC5649: pkcs11.CKM_AES_KEY_WRAP_PAD,
		RSAExponent:    65537,
		Unsuitable: "its PKCS#11 module computes ECDH on the device but receives the shared secret back (the DERIVE ECDH command " +
			"returns it), applies the KDF in the library and keeps the derived key in host memory as a library session object; " +
			"C_UnwrapKey takes only Yubico's wrap formats (CKM_YUBICO_AES_CCM_WRAP, CKM_YUBICO_RSA_WRAP, CKM_RSA_AES_KEY_WRAP), " +
			"so a card's c cannot be unwrapped into a key object either. Every profile would put S, Z or K_I in host memory." +
			unsuitableCommon,
	}},

	// Google Cloud KMS, kmsp11: manufacturerID "Google", model "Cloud KMS Token".
	{[]tokenID{{"Google", "Cloud KMS Token"}}, Mechanisms{
		Name:           "Google Cloud KMS",
		Key:            "gcpkms",
		Published:      true,
		Source:         "GoogleCloudPlatform/kms-integrations kmsp11/docs/user_guide.md (function table) and kmsp11/token.cc (NewTokenInfo)",
		KeyWrapRFC5649: pkcs11.CKM_AES_KEY_WRAP_PAD,
		RSAExponent:    65537,
		Unsuitable: "the Cloud KMS PKCS#11 library implements neither C_WrapKey, C_UnwrapKey nor C_DeriveKey, so no profile can turn " +
			"a card's c into K_I inside it and K_I cannot be stored under a KEK; only C_Decrypt exists, which would hand r to the " +
			"host. (It also ignores the PIN: C_Login accepts any.)" + unsuitableCommon,
	}},
}
