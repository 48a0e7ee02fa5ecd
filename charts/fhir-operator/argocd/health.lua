-- Argo CD health check for the four kinds of fhiroperator.io: FhirEndpoint,
-- KeyRotationSchedule, RateLimitTier, BackupPolicy. One script for all four
-- (it dispatches on obj.kind); install it under each kind's key, see the
-- project README, "GitOps (Argo CD)".
--
-- Written for Argo CD's Lua (gopher-lua, Lua 5.1) without the standard
-- libraries: only base functions (ipairs, tostring) and no string methods.
-- Tested with Debian's lua5.1 and lua5.4 against status samples in
-- health_test.yaml (operator/tests/argocd_health.rs).

local function health(status, message)
  return { status = status, message = message }
end

local function condition(status, type)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type then
      return c
    end
  end
  return nil
end

local function is(c, value)
  return c ~= nil and c.status == value
end

-- "Reason: message", or whichever of the two is set.
local function describe(c)
  local reason = c.reason or ""
  if c.message == nil or c.message == "" then
    return reason
  end
  if reason == "" then
    return c.message
  end
  return reason .. ": " .. c.message
end

-- FhirEndpoint: Ready=True is healthy unless Degraded=True (an optional API
-- not served, e.g. no ServiceMonitor); a rollout is progressing; any other
-- Ready=False (InvalidSpec, TierNotFound, TlsSecretUnusable, ...) is degraded.
local function fhirEndpoint(status, ready)
  local progressing = condition(status, "Progressing")
  local degraded = condition(status, "Degraded")
  if is(ready, "False") and ready.reason ~= "RollingOut" then
    return health("Degraded", describe(ready))
  end
  if is(progressing, "True") then
    return health("Progressing", describe(progressing))
  end
  if not is(ready, "True") then
    return health("Progressing", describe(ready))
  end
  if is(degraded, "True") then
    return health("Degraded", describe(degraded))
  end
  return health("Healthy", describe(ready))
end

-- KeyRotationSchedule: keys in force (Ready=True) are healthy, also while a
-- scheduled rotation runs (Progressing=True): routine work must not flip an
-- application to Progressing at every rotation. Without keys yet, a rotation
-- under way is progressing; Ready=False otherwise is degraded.
local function keyRotationSchedule(status, ready)
  local progressing = condition(status, "Progressing")
  if is(ready, "True") then
    if is(progressing, "True") then
      return health("Healthy", "keys in force; rotating: " .. describe(progressing))
    end
    return health("Healthy", describe(ready))
  end
  if is(progressing, "True") then
    return health("Progressing", describe(progressing))
  end
  return health("Degraded", describe(ready))
end

-- RateLimitTier: Ready says whether the gateway can enforce the tier.
local function rateLimitTier(status, ready)
  if is(ready, "True") then
    return health("Healthy", describe(ready))
  end
  return health("Degraded", describe(ready))
end

-- BackupPolicy: Ready=False or a failed last backup (LastBackupSucceeded=False)
-- is degraded; a backup running on schedule is not "progressing".
local function backupPolicy(status, ready)
  local last = condition(status, "LastBackupSucceeded")
  if not is(ready, "True") then
    return health("Degraded", describe(ready))
  end
  if is(last, "False") then
    return health("Degraded", describe(last))
  end
  if last == nil then
    return health("Healthy", "no backup has run yet")
  end
  return health("Healthy", describe(last))
end

local checks = {
  FhirEndpoint = fhirEndpoint,
  KeyRotationSchedule = keyRotationSchedule,
  RateLimitTier = rateLimitTier,
  BackupPolicy = backupPolicy,
}

local check = checks[obj.kind]
if check == nil then
  return health("Unknown", "no health check for kind " .. tostring(obj.kind))
end
local status = obj.status
if status == nil then
  return health("Progressing", "waiting for the operator to write status")
end
local generation = obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  return health("Progressing", "the operator has not yet observed generation " .. tostring(generation))
end
-- KeyRotationSchedules and BackupPolicies can be suspended: that is the
-- user's choice, not a fault.
if obj.spec ~= nil and obj.spec.suspend == true then
  return health("Suspended", obj.kind .. " is suspended (spec.suspend)")
end
local ready = condition(status, "Ready")
if ready == nil then
  return health("Progressing", "waiting for the operator to set Ready")
end
return check(status, ready)
